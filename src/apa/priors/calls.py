"""What a method spends: rows through the diffusion networks, counted per image row.

One *call row* is one image through one network pass: a row of ε (the denoiser), a row of the
denoiser's features (the surrogate's input), or a row of a backward pass through either (the
reward's gradient). A batch of 32 images at one step of a sampler whose reward reads features and
takes their gradient spends 32 + 32 + 32 rows. Methods compare at equal compute by these counts.

Each network notes its rows (:func:`counted`: the built-in UNet's forward and features, including
the copies a fine-tuning method trains, and SD 1.5's ε and features); a count is open in one thread,
so sessions sharing one prior in a server each count their own rows:

    with counting() as calls:
        ...                      # sample, fit, score: every eps / features row of this thread
    calls.total, calls.as_dict() # {"eps": ..., "features": ..., "backward": ..., "total": ...}
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from typing import Iterator

import torch


@dataclass(eq=False)  # a count is itself: two open counts with equal values are two
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


_OPEN = threading.local()  # .counts: the CallRows open in this thread, outermost first


def _open() -> list[CallRows]:
    if not hasattr(_OPEN, "counts"):  # a thread's first use
        _OPEN.counts = []
    return _OPEN.counts


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts the rows a gradient flows back through (out [N, ...])."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, counts: list[CallRows]) -> torch.Tensor:  # type: ignore[override]
        ctx.counts = counts
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        for rows in ctx.counts:
            rows.backward += int(grad.shape[0])
        return grad, None


def counted(kind: str, out: torch.Tensor) -> torch.Tensor:
    """A network pass's output [N, ...] of ``kind`` ("eps" | "features"), its N rows added to every
    count open in this thread (and its gradient's rows, when one flows back through it)."""
    counts = list(_open())
    if not counts:
        return out
    for rows in counts:
        setattr(rows, kind, getattr(rows, kind) + int(out.shape[0]))
    return _CountBackward.apply(out, counts) if out.requires_grad else out


@contextlib.contextmanager
def counting() -> Iterator[CallRows]:
    """Count the rows of every prior network pass made in this thread while the block runs (nested
    counts each see them). Yields the :class:`CallRows` being filled."""
    rows = CallRows()
    _open().append(rows)
    try:
        yield rows
    finally:
        _open().remove(rows)


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Network passes made in this thread while the block runs count in no count opened outside it:
    measuring a batch (a report's prior references) is not the cost of drawing it."""
    outside = _open()[:]
    _open().clear()
    try:
        yield
    finally:
        _open()[:] = outside
