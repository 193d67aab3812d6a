"""The method under comparison: a real ``apa align`` session (FKC-SMC steered by the refit surrogate).

The run starts a :class:`apa.session.Session` in ``workdir`` with the given budget and drives it as
``apa align`` does (``apa.session.lifecycle.drive``): the simulated user rates every round, and the
FINAL step stores the final batch with its records. Sessions are deterministic in (seed, round,
purpose), so after round r the session's ``final_samples`` are exactly those a session whose budget
ends at round r would produce: the evaluation batch at each checkpoint is that session's final batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from apa.baselines.common import Clock, CountingUser, MethodRun, RoundRecord, check_checkpoints
from apa.config import AlignConfig
from apa.registry import METHODS
from apa.session import Session, with_overrides
from apa.session.lifecycle import drive

# the `apa compare` settings an `apa align` session takes (``registry.Method``): field -> comparison setting
SESSION_COMPARE = {"prior.name": "prior", "prior.weights": "prior_weights", "sampler.particles": "particles",
                   "sampler.steps": "steps", "surrogate.epochs": "epochs", "feedback.prefer": "prefer"}


def session_config(config: AlignConfig | None, user, budget: int, per_round: int, seed: int,
                   eval_samples: int) -> AlignConfig:
    """The session's configuration: ``config`` (default: the project defaults) with the run's budget."""
    cfg = config or AlignConfig()
    prefer = cfg.feedback.prefer if user is None or user.prefer is None else tuple(user.prefer)
    return with_overrides(cfg, session={"budget": budget, "per_round": per_round, "seed": seed,
                                        "eval_samples": eval_samples}, feedback={"prefer": prefer})


def _records(session: Session, seconds: dict[int, float]) -> tuple[RoundRecord, ...]:
    """The session's rounds as records: feedback spent, scores and the rated images."""
    out, spent = [], 0
    for row in session.store.rounds():
        scores = tuple(x["score"] for x in session.store.ratings(row["round"]) if x["score"] is not None)
        spent += len(scores)
        out.append(RoundRecord(row["round"], spent, scores, session.shown_images(row["round"]),
                               seconds.get(row["round"], float("nan"))))
    return tuple(out)


def run_session(method: str, prior, user, budget: int, per_round: int, seed: int, *,
                config: AlignConfig | None, checkpoints: Sequence[int], eval_samples: int,
                workdir: Path | None) -> MethodRun:
    """Run an ``apa align`` session (``Session.start``, then ``drive``) in ``workdir`` (new or empty),
    recorded as ``method``, and evaluate it at the checkpoints."""
    if workdir is None:
        raise ValueError(f"the {method} method keeps a session on disk: give it a workdir")
    cfg = session_config(config, user, budget, per_round, seed, eval_samples)
    checks = check_checkpoints(checkpoints, budget, per_round)
    user = CountingUser(user)
    session = Session.start(Path(workdir), cfg, progress=False, kind=method, parts=(prior, user))
    clock, batches, round_seconds, seconds = Clock(), {}, {}, [0.0]

    def on_round(r: int, s: Session) -> None:
        round_seconds[r] = clock.seconds() - sum(round_seconds.values())
        spent = s.store.spent()
        if spent in checks:
            batches[spent] = clock.evaluate(spent, lambda: s.final_samples(eval_samples))
        seconds[0] = clock.seconds()  # the method's time ends with its last round (FINAL only measures)

    drive(session, on_round=on_round)  # its FINAL step stores the last checkpoint's batch (drawn once)
    return MethodRun(method, _records(session, round_seconds), batches, lambda n, gen: session.final_samples(n),
                     seconds[0], clock.eval_seconds, user.rated, eval_calls=clock.eval_calls,
                     info={"config": cfg.to_dict(), "timings": dict(session.timings), "workdir": str(workdir)})


@METHODS.register("fkc", config=AlignConfig, compare=SESSION_COMPARE)
def run(prior, user, budget: int, per_round: int, seed: int, *, config: AlignConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """FKC-SMC alignment as ``apa align`` runs it. The final sampler ignores its generator argument:
    a session's final batch is seeded by the session itself."""
    return run_session("fkc", prior, user, budget, per_round, seed, config=config,
                       checkpoints=checkpoints, eval_samples=eval_samples, workdir=workdir)
