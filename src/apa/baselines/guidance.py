"""Guidance alone: the same loop as FKC (surrogate refit each round, same acquisition), but the
sampler follows the surrogate's gradient with no Feynman-Kac weights and no resampling
(``fkc_sample(..., use_weights=False)``). The difference to ``fkc`` isolates what the weights add.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from apa.registry import METHODS
from apa.baselines.common import MethodRun
from apa.baselines.fkc import run_session
from apa.config import AlignConfig
from apa.session import Session


class GuidanceSession(Session):
    """A session whose sampler drops the weights: every particle keeps weight 1/N, none is resampled."""

    kind = "guidance"
    use_weights = False


@METHODS.register("guidance")
def run(prior, user, budget: int, per_round: int, seed: int, *, config: AlignConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """Surrogate-gradient guidance with the FKC session's loop, weights off."""
    return run_session(GuidanceSession, "guidance", prior, user, budget, per_round, seed, config=config,
                       checkpoints=checkpoints, eval_samples=eval_samples, workdir=workdir)
