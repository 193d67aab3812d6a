"""What a session's end measures of its final batch, as JSON records: the report is a view of them.

The session (``apa.session``) hands over a :class:`FinalView` when its final batch is stored and
stores what :func:`measure_final` returns:
  final_eval      the simulated user's view of the final batch ({} for a person)
  prior_baseline  the same view of plain prior samples: what the prior gives without feedback
  final_checks    the final batch's novelty and target fidelity against prior references
Both prior views read the prior's reference samples, a pure function of its weights: shipped beside
the built-in priors' weights, else drawn once per machine and cached (``$APA_DATA/baselines``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from apa import data
from apa.config import SamplerConfig
from apa.measures import novelty

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
    prior_weights: Path | None  # the prior's weights file, which keys the prior's reference samples (None: none)


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


def prior_baseline(view: FinalView, sha: str | None) -> dict[str, Any]:
    """The simulated user's view of n plain samples of the prior (no feedback): the first n of the
    prior's reference samples (:func:`novelty.prior_reference`: shipped with the built-in priors'
    weights, else drawn once and cached), so a report samples nothing the prior has not drawn before;
    {} for a person or a prior without a weights file (``sha``: its weights' digest, :func:`prior_sha`)."""
    evaluate = view.user.evaluate
    if evaluate is None or sha is None:
        return {}
    n = view.eval_samples
    reference = novelty.prior_reference(view.prior, sha, view.sampler.steps, cache_dir(),
                                        max(n, novelty.REFERENCE_SAMPLES))
    with torch.no_grad():
        return {**evaluate(view.prior.decode(reference[:n])), "n": n}


def final_checks_of(view: FinalView, sha: str | None) -> dict[str, Any]:
    """Novelty and target fidelity of the final batch ({} for a prior with no weights file to cache a
    reference on; ``sha``: its weights' digest, :func:`prior_sha`)."""
    if sha is None:
        return {}
    return novelty.final_checks(view, novelty.prior_reference(view.prior, sha, view.sampler.steps, cache_dir()))


def measure_final(view: FinalView) -> dict[str, dict[str, Any]]:
    """The end's records of the final batch, measured now, in JSON types (str class keys): {name: record}."""
    sha = prior_sha(view)  # the weights read once: both prior views are keyed on them
    measured = {"final_eval": final_eval(view), "prior_baseline": prior_baseline(view, sha),
                "final_checks": final_checks_of(view, sha)}
    return {name: json.loads(json.dumps(value, default=float)) for name, value in measured.items()}
