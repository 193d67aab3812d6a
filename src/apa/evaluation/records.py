"""What a session's end measures, stored with the session as records: the report is a view of them.

When the final batch is stored (the lifecycle's FINAL step), the session measures and records:
  final_eval      the simulated user's view of the final batch ({} for a person)
  prior_baseline  the same view of plain prior samples: what the prior gives without feedback
  final_checks    the final batch's novelty and target fidelity against prior references
The prior-only samples behind the last two are cached per prior (``$APA_DATA/baselines``), since
every session of one prior and user shares them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apa import data
from apa.atomic import write_file

RECORDS = ("final_eval", "prior_baseline", "final_checks")


def final_eval(session, images: torch.Tensor) -> dict[str, Any]:
    """The simulated user's view of the final batch, images [n, C, H, W] ({} for a person)."""
    evaluate = getattr(session.feedback, "evaluate", None)
    return {} if evaluate is None else evaluate(images)


def cache_dir() -> Path:
    """Where prior-only baselines are cached: ``$APA_DATA/baselines`` (default ``~/.cache/apa/baselines``)."""
    from apa.data import data_dir

    return data_dir() / "baselines"


def prior_sha(session) -> str | None:
    """The sha256 of the session's prior weights file (None for a prior without one, e.g. a hub model)."""
    weights = getattr(session.cfg.prior, "weights", None)
    if not weights:
        try:
            from apa.priors.ddpm import weights_path

            weights = weights_path(session.cfg.prior.name)
        except Exception:
            return None
    return data.file_sha256(Path(weights)) if Path(weights).is_file() else None


def baseline_key(session, n: int) -> str | None:
    """The cache key of the prior-only baseline: prior weights' sha256, the simulated user, n, steps."""
    sha = prior_sha(session)
    if sha is None:
        return None
    fb = session.cfg.feedback
    user = {k: getattr(fb, k, None) for k in ("name", "prefer", "mode", "confidence", "dataset", "oracle_weights")}
    if user.get("oracle_weights") and Path(user["oracle_weights"]).is_file():
        user["oracle_weights"] = data.file_sha256(Path(user["oracle_weights"]))
    text = json.dumps({"prior": sha, "user": user, "n": n,
                       "steps": session.cfg.sampler.steps, "seed": 0}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def prior_baseline(session) -> dict[str, Any]:
    """The simulated user's view of n plain samples of the prior (no feedback), cached per prior and user."""
    evaluate = getattr(session.feedback, "evaluate", None)
    if evaluate is None:
        return {}
    from apa.smc.sampler import sample_prior

    n = session.cfg.session.eval_samples
    key = baseline_key(session, n)
    if key is None:  # no weights file to key the cache on (e.g. a hub model): not recomputed per report
        return {}
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # a damaged cache entry is recomputed
    cfg = replace(session.cfg.sampler, weights="none", diversity=False)
    images = sample_prior(session.prior, n, cfg.steps, torch.Generator().manual_seed(0), batch_size=n, config=cfg)
    with torch.no_grad():
        out = {**evaluate(images.cpu()), "n": n}
    out = json.loads(json.dumps(out, default=float))  # the same types as a cached copy (str class keys)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(out).encode(), mode=0o644, shared=True)
    except OSError:
        pass  # no cache: the next report recomputes it
    return out


def final_checks_of(session, images: torch.Tensor) -> dict[str, Any]:
    """Novelty and target fidelity of the final batch, images [n, C, H, W] ({} for a prior with no
    weights file to cache a reference on)."""
    from apa.evaluation.novelty import final_checks, prior_reference

    reference = prior_reference(session)
    return {} if reference is None else final_checks(session, images, reference)


def measure_final(session, images: torch.Tensor) -> dict[str, dict[str, Any]]:
    """The end's records of the final batch, images [n, C, H, W], measured now: {name: record}."""
    return {"final_eval": final_eval(session, images), "prior_baseline": prior_baseline(session),
            "final_checks": final_checks_of(session, images)}


def record_final(session, images: torch.Tensor | None = None, final_calls: int | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Measure the end's records of the final batch (``images``, else the stored batch) and store them
    with the session (durably, one by one); returns them as stored (JSON types: str class keys).
    ``final_calls``: the network-call rows the batch cost, when it was just drawn."""
    measured = measure_final(session, session.store.final_images() if images is None else images)
    if final_calls is not None:
        measured["final_checks"]["final_calls"] = final_calls
    stored = {name: json.loads(json.dumps(value, default=float)) for name, value in measured.items()}
    for name, value in stored.items():
        session.store.save_record(name, value)
    return stored


def final_records(session) -> dict[str, dict[str, Any]]:
    """The end's records as stored; a session whose final batch has none yet (it stopped between
    the two, or was finished by an older version) has them measured and stored first. Before the
    final batch exists every record is {}."""
    if not session.store.final_path.exists():
        return {name: {} for name in RECORDS}
    stored = {name: session.store.record(name) for name in RECORDS}
    if any(value is None for value in stored.values()):
        return record_final(session)
    return stored
