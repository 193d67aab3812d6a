"""What a session's end measures of its final batch, as JSON records: the report is a view of them.

The session (``apa.session``) hands over a :class:`FinalView` when its final batch is stored and
stores what :func:`measure_final` returns:
  final_eval      the simulated user's view of the final batch ({} for a person)
  prior_baseline  the same view of plain prior samples: what the prior gives without feedback
  final_checks    the final batch's novelty and target fidelity against prior references
The prior-only samples behind the last two are cached per prior (``$APA_DATA/baselines``), since
every session of one prior and user shares them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from apa import data
from apa.atomic import write_file
from apa.config import SamplerConfig
from apa.measures import novelty
from apa.smc.sampler import sample_prior

RECORDS = ("final_eval", "prior_baseline", "final_checks")


@dataclass(frozen=True)
class FinalView:
    """What the end of a session measures: its final batch and what the batch came from."""

    images: torch.Tensor  # the final batch [n, C, H, W] in [0, 1]
    rated: torch.Tensor  # the rated particles the last surrogate learned from [m, *event]
    targets: torch.Tensor  # their ratings on [-1, 1] [m]
    prior: Any  # the frozen prior: decode, plain samples
    user: Any  # who rated (a FeedbackSource; its ``evaluate`` is None for a person)
    reward: Callable[[torch.Tensor], torch.Tensor]  # the final batch's reward r(x0): [N, *event] -> [N]
    sampler: SamplerConfig  # the session's sampler: β_end, steps
    eval_samples: int  # n of the prior baseline
    target_is_own: bool  # drawn from the noise end: its target is the prior tilted by exp(β_end·r)
    prior_weights: Path | None  # the prior's weights file, which keys the prior-only caches (None: not cached)
    user_options: dict[str, Any]  # the simulated user's options, which key the prior baseline's cache


def final_eval(view: FinalView) -> dict[str, Any]:
    """The simulated user's view of the final batch ({} for a person)."""
    evaluate = view.user.evaluate
    return {} if evaluate is None else evaluate(view.images)


def cache_dir() -> Path:
    """Where prior-only baselines are cached: ``$APA_DATA/baselines`` (default ``~/.cache/apa/baselines``)."""
    return data.data_dir() / "baselines"


def prior_sha(view: FinalView) -> str | None:
    """The sha256 of the prior's weights file (None for a prior without one, e.g. a hub model)."""
    weights = view.prior_weights
    return data.file_sha256(weights) if weights is not None and weights.is_file() else None


def baseline_key(view: FinalView, n: int) -> str | None:
    """The cache key of the prior-only baseline: prior weights' sha256, the simulated user, n, steps."""
    sha = prior_sha(view)
    if sha is None:
        return None
    user = dict(view.user_options)
    if user.get("oracle_weights") and Path(user["oracle_weights"]).is_file():
        user["oracle_weights"] = data.file_sha256(Path(user["oracle_weights"]))
    text = json.dumps({"prior": sha, "user": user, "n": n, "steps": view.sampler.steps, "seed": 0},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def prior_baseline(view: FinalView) -> dict[str, Any]:
    """The simulated user's view of n plain samples of the prior (no feedback), cached per prior and user."""
    evaluate = view.user.evaluate
    if evaluate is None:
        return {}
    n = view.eval_samples
    key = baseline_key(view, n)
    if key is None:  # no weights file to key the cache on (e.g. a hub model): not recomputed per report
        return {}
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # a damaged cache entry is recomputed
    cfg = replace(view.sampler, weights="none", diversity=False)
    images = sample_prior(view.prior, n, cfg.steps, torch.Generator().manual_seed(0), batch_size=n, config=cfg)
    with torch.no_grad():
        out = {**evaluate(images.cpu()), "n": n}
    out = json.loads(json.dumps(out, default=float))  # the same types as a cached copy (str class keys)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(out).encode(), mode=0o644, shared=True)
    except OSError:
        pass  # no cache: the next report recomputes it
    return out


def final_checks_of(view: FinalView) -> dict[str, Any]:
    """Novelty and target fidelity of the final batch ({} for a prior with no weights file to cache a
    reference on)."""
    sha = prior_sha(view)
    reference = None if sha is None else novelty.prior_reference(view.prior, sha, view.sampler.steps, cache_dir())
    return {} if reference is None else novelty.final_checks(view, reference)


def measure_final(view: FinalView) -> dict[str, dict[str, Any]]:
    """The end's records of the final batch, measured now, in JSON types (str class keys): {name: record}."""
    measured = {"final_eval": final_eval(view), "prior_baseline": prior_baseline(view),
                "final_checks": final_checks_of(view)}
    return {name: json.loads(json.dumps(value, default=float)) for name, value in measured.items()}
