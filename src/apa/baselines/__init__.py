"""The methods ``apa compare`` puts side by side, each behind the signature of ``baselines.common``:

- ``fkc``: this project's method, a real ``apa align`` session (FKC-SMC + refit surrogate)
- ``guidance``: the same loop with the surrogate's gradient only (no weights, no resampling)
- ``papa`` / ``epapa``: online fine-tuning of the prior's ε-network from +1/-1 feedback
- ``best_of_n``: rate prior samples, then refine around the best-rated ones (SDEdit-style)
- ``prior``: no alignment
- ``best_of_m`` / ``best_of_m_is``: a surrogate fitted on rated prior samples picks (or importance
  resamples) n of M fresh ones
- the field's methods, run with ``--methods``: ``fk_steering``, ``das_online``, ``seiko_ucb``

A method is one module: its settings, a frozen dataclass whose fields are ``knob``s (help sentence
beside the field, checks in ``__post_init__``), and its run function, registered with them in one
call, ``@METHODS.register(name, config=TheConfig, compare={field: compare_setting})`` (see
``registry.Method``); ``registry.METHODS`` names the module so that `apa compare --help` lists it
without importing it.
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
