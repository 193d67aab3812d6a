"""Guidance alone: the same loop as FKC (surrogate refit each round, same acquisition), but the
sampler follows the surrogate's gradient with no Feynman-Kac weights and no resampling
(``SamplerConfig.weights="none"``). The difference to ``fkc`` isolates what the weights add.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from apa.baselines.common import MethodRun
from apa.baselines.fkc import SESSION_COMPARE, run_session
from apa.config import AlignConfig
from apa.registry import METHODS
from apa.session import with_overrides


@METHODS.register("guidance", config=AlignConfig, compare=SESSION_COMPARE)
def run(prior, user, budget: int, per_round: int, seed: int, *, config: AlignConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """Surrogate-gradient guidance with the FKC session's loop, weights off (every particle keeps 1/N)."""
    cfg = with_overrides(config or AlignConfig(), sampler={"weights": "none"})
    return run_session("guidance", prior, user, budget, per_round, seed, config=cfg,
                       checkpoints=checkpoints, eval_samples=eval_samples, workdir=workdir)
