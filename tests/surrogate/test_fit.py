"""The refit's losses: without weights, torch's own fused reductions to the last bit (a session made
before rating weights existed refits to the same surrogate); with weights, the weighted mean."""

import torch
from torch.nn import functional as F

from apa.surrogate.fit import _cross_entropy, _mse


def _value_and_grad(loss_fn, out, y, w):
    out = out.clone().requires_grad_(True)
    value = loss_fn(out, y, w)
    value.backward()
    return value.detach(), out.grad


def test_unweighted_losses_are_torchs_own_reductions_bit_for_bit():
    """An elementwise loss followed by .mean() gives the fused reduction's value but not its gradient
    to the last bit (measured: 2e-9 apart), and 200 epochs turn that into another surrogate: value
    and gradient must be equal, not close."""
    gen = torch.Generator().manual_seed(0)
    out, y = torch.randn(37, generator=gen), torch.randint(0, 2, (37,), generator=gen).float() * 2 - 1
    fused_ce = lambda o, t, w: F.binary_cross_entropy_with_logits(o, (t + 1.0) / 2.0)  # noqa: E731
    fused_mse = lambda o, t, w: (o - t).pow(2).mean()  # noqa: E731
    for ours, reference in ((_cross_entropy, fused_ce), (_mse, fused_mse)):
        (v1, g1), (v2, g2) = _value_and_grad(ours, out, y, None), _value_and_grad(reference, out, y, None)
        assert torch.equal(v1, v2) and torch.equal(g1, g2), ours.__name__


def test_weights_give_the_weighted_mean_and_zero_weight_drops_a_rating():
    out, y = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, -1.0, -1.0])
    w = torch.tensor([1.0, 2.0, 0.0])
    per = (out - y).pow(2)
    assert torch.allclose(_mse(out, y, w), (per * w).sum() / w.sum())
    assert torch.allclose(_cross_entropy(out, y, w), _cross_entropy(out[:2], y[:2], torch.tensor([1.0, 2.0])))
