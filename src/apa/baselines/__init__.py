"""The methods ``apa compare`` puts side by side, each behind the signature of ``baselines.common``:

- ``fkc``: this project's method, a real ``apa align`` session (FKC-SMC + refit surrogate)
- ``guidance``: the same loop with the surrogate's gradient only (no weights, no resampling)
- ``papa`` / ``epapa``: online fine-tuning of the prior's ε-network from +1/-1 feedback
- ``best_of_n``: rate prior samples, then refine around the best-rated ones (SDEdit-style)
- ``prior``: no alignment
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from apa.registry import METHODS

if TYPE_CHECKING:
    from apa.baselines.common import MethodRun


def get(method: str) -> Callable[..., MethodRun]:
    """The run function of a method (its module is imported on first use)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS.get(method)


__all__ = ["METHODS", "get"]
