"""Refit the surrogate on all feedback so far (the seed: Adam 1e-3, 200 epochs, batch 32, MSE; or
cross-entropy on P(liked | x) for the logistic surrogate, ``Ensemble.loss``).

Deterministic given its generator: a resumed session refits to the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from apa.surrogate.model import Ensemble, FeatureSurrogate


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 200  # passes over all history per round (seed)
    batch_size: int = 32  # (seed)
    lr: float = 1e-3  # Adam (seed)
    weight_decay: float = 0.0


def fit(model: Ensemble, x: torch.Tensor, y: torch.Tensor, cfg: FitConfig, generator: torch.Generator,
        weights: torch.Tensor | None = None) -> float:
    """Train every member on (x [n, ...], y [n] ratings in [-1, 1]) by the ensemble's loss: MSE on the
    rating, or binary cross-entropy of the member's logit against the probability (y + 1) / 2 (a
    graded rating is a soft label). ``weights`` [n] (default all 1) weigh each rating's loss, e.g.
    older ratings less after a change of taste. Returns the final mean training loss.

    Feature surrogates embed x once (the features are frozen), so each epoch costs only the heads.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need matching, non-empty inputs and ratings, got {x.shape[0]} and {y.shape[0]}")
    feats = None
    if isinstance(model.members[0], FeatureSurrogate):
        with torch.no_grad():
            feats = model.members[0].embed(x)
    loss = _mse if model.loss == "mse" else _cross_entropy
    w = None if weights is None else weights.to(y)
    losses = [_fit_member(m, x if feats is None else feats, y, w, cfg, generator, feats is not None, loss)
              for m in model.members]
    return float(sum(losses) / len(losses))


def _weighted_mean(values: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Σ w·v / Σ w over the batch; the plain mean when there are no weights. [b] -> scalar."""
    return values.mean() if w is None else (w * values).sum() / w.sum()


def _mse(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(f − y)², weighted mean over the batch."""
    return _weighted_mean((out - y).pow(2), w)


def _cross_entropy(logit: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """−[p·log σ(f) + (1 − p)·log(1 − σ(f))] with p = (y + 1) / 2, weighted mean over the batch
    (without weights, torch's own mean reduction: the same numbers, to the last bit, as before weights)."""
    if w is None:
        return F.binary_cross_entropy_with_logits(logit, (y + 1.0) / 2.0)
    return _weighted_mean(F.binary_cross_entropy_with_logits(logit, (y + 1.0) / 2.0, reduction="none"), w)


def _fit_member(member: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, cfg: FitConfig,
                gen: torch.Generator, on_features: bool, loss_fn=_mse) -> float:
    forward = member.head if on_features else member
    params = [p for p in member.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    member.train()
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            total = 0.0
            for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                loss = loss_fn(forward(x[idx]), y[idx], None if w is None else w[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
    member.eval()
    return total / n
