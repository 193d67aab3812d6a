"""The methods ``apa compare`` puts side by side, each behind the signature of ``baselines.common``:

- ``fkc``: this project's method, a real ``apa align`` session (FKC-SMC + refit surrogate)
- ``guidance``: the same loop with the surrogate's gradient only (no weights, no resampling)
- ``papa`` / ``epapa``: online fine-tuning of the prior's ε-network from +1/-1 feedback
- ``best_of_n``: rate prior samples, then refine around the best-rated ones (SDEdit-style)
- ``prior``: no alignment
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from apa.baselines.common import MethodRun

METHODS: dict[str, tuple[str, str]] = {  # name -> (module, function)
    "fkc": ("apa.baselines.fkc", "run"),
    "papa": ("apa.baselines.papa", "run_papa"),
    "epapa": ("apa.baselines.papa", "run_epapa"),
    "best_of_n": ("apa.baselines.best_of_n", "run"),
    "guidance": ("apa.baselines.guidance", "run"),
    "prior": ("apa.baselines.prior", "run"),
}


def get(method: str) -> Callable[..., MethodRun]:
    """The run function of a method (its module is imported on first use)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    module, fn = METHODS[method]
    return getattr(importlib.import_module(module), fn)


__all__ = ["METHODS", "get"]
