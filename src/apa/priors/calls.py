"""What a method spends: rows through the prior's networks, counted per image row.

One *call row* is one image through one network pass: a row of ε (the denoiser), a row of the
denoiser's features (the surrogate's input), or a row of a backward pass through either (the
reward's gradient). A batch of 32 images at one step of a sampler whose reward reads features and
takes their gradient spends 32 + 32 + 32 rows. Methods compare at equal compute by these counts.

    with counting(prior) as calls:
        ...                      # sample, fit, score: every eps / features row is counted
    calls.total, calls.as_dict() # {"eps": ..., "features": ..., "backward": ..., "total": ...}
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from apa.priors.base import HasFeatures


@dataclass
class CallRows:
    """Image rows through a prior's networks: forward ε, forward features, and backward through either."""

    eps: int = 0
    features: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.eps + self.features + self.backward

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def __sub__(self, other: "CallRows") -> "CallRows":
        return CallRows(self.eps - other.eps, self.features - other.features, self.backward - other.backward)

    def copy(self) -> "CallRows":
        return CallRows(self.eps, self.features, self.backward)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts the rows a gradient flows back through (out [N, ...])."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, rows: CallRows) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = rows
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.rows.backward += int(grad.shape[0])
        return grad, None


def _counted(fn: Callable[..., torch.Tensor], rows: CallRows, field: str) -> Callable[..., torch.Tensor]:
    """``fn`` (a network pass whose first argument holds the rows [N, ...]) counting its rows into ``rows``."""

    def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        setattr(rows, field, getattr(rows, field) + int(x.shape[0]))
        out = fn(x, *args, **kwargs)
        return _CountBackward.apply(out, rows) if out.requires_grad else out

    return call


@contextlib.contextmanager
def counting(prior: Any, rows: CallRows | None = None) -> Iterator[CallRows]:
    """Count every row through ``prior.eps`` and ``prior.features`` (and the gradients through them)
    while the block runs; the prior is restored after. Nested blocks on one prior add to the outer
    count too. Yields the :class:`CallRows` being filled (``rows`` when given: counts accumulate)."""
    rows = rows if rows is not None else CallRows()
    names = ("eps", "features") if isinstance(prior, HasFeatures) else ("eps",)
    patched = {name: prior.__dict__.get(name) for name in names}
    for name in patched:  # an instance attribute shadows the class's method for every caller
        setattr(prior, name, _counted(getattr(prior, name), rows, name))
    try:
        yield rows
    finally:
        for name, own in patched.items():
            if own is None:
                delattr(prior, name)
            else:
                setattr(prior, name, own)
