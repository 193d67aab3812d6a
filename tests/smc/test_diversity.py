import torch

from apa.smc.diversity import diversity


def _brute(u, hist=None):
    others = u.detach() if hist is None else torch.cat([u.detach(), hist])
    n, d = u.shape[0], u[0].numel()
    m = others.shape[0] - 1
    out = []
    for i in range(n):
        diffs = [((u[i] - others[j]) ** 2).sum() for j in range(others.shape[0]) if not (j == i)]
        out.append(torch.stack(diffs).sum() / (d * m))
    return torch.stack(out)


def test_value_and_gradient_match_the_definition():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 3, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    hist = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    for h in (None, hist):
        fast, slow = diversity(u, h), _brute(u, h)
        assert torch.allclose(fast, slow)
        (gf,) = torch.autograd.grad(fast.sum(), u)
        (gs,) = torch.autograd.grad(slow.sum(), u)
        assert torch.allclose(gf, gs)


def test_gradient_points_away_from_the_others():
    u = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    (g,) = torch.autograd.grad(diversity(u).sum(), u)
    assert g[0, 0] < 0 and g[1, 0] > 0


def test_single_particle_without_history_is_zero():
    assert diversity(torch.ones(1, 4)).tolist() == [0.0]
