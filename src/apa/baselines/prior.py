"""The prior with no alignment: plain ancestral samples, no feedback spent.

Its evaluation batch does not depend on the budget, so one batch (drawn with the generator of
feedback 0) stands at every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from apa.baselines.common import Clock, MethodRun, check_checkpoints, plain_samples
from apa.knobs import at_least, knob
from apa.registry import METHODS
from apa.seeding import generator


@dataclass(frozen=True)
class PriorConfig:
    """The plain prior's one setting."""

    steps: int = knob(25, "ancestral steps")

    def __post_init__(self) -> None:
        at_least("steps", self.steps, 1)


@METHODS.register("prior", config=PriorConfig, compare={"steps": "steps"})
def run(prior, user, budget: int, per_round: int, seed: int, *, config: PriorConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """Plain samples at every checkpoint (the same batch); ``user`` is never asked."""
    cfg = config or PriorConfig()
    checks = check_checkpoints(checkpoints, budget, per_round)
    clock = Clock()
    batch = clock.evaluate(0, lambda: plain_samples(prior, eval_samples, cfg.steps, generator(seed, 0, "eval")))
    seconds = clock.eval_seconds[0]
    return MethodRun("prior", (), {spent: batch for spent in checks},
                     lambda n, gen: plain_samples(prior, n, cfg.steps, gen), 0.0,
                     {spent: seconds for spent in checks}, 0, {"config": asdict(cfg)},
                     {spent: clock.eval_calls[0] for spent in checks})
