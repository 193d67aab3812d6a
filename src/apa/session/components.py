"""The frozen parts of a session, built once per distinct configuration and shared.

A prior (with SD 1.5, a whole UNet, VAE and text encoder) and a feedback model are read-only
while sessions run, so every session whose configuration names the same one uses the same
object: ``apa serve`` holds one prior for all its people, and ``apa compare`` and the
benchmarks one for all their runs. A session keeps only its own state (ratings, surrogate,
particles).

The caches hold their objects weakly: a prior lives as long as some session (or the server)
uses it, and is freed with the last one. A session's label noise is its own (it draws from the
session's seed), so it wraps the shared source per session.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

from apa.config import AlignConfig
from apa.feedback.base import FeedbackSource, with_label_noise
from apa.feedback.drift import DriftingUser
from apa.priors.batching import BatchingPrior
from apa.registry import FEEDBACK, PRIORS
from apa.session.checks import SessionError, check_device, check_prior, check_tastes

PER_SESSION = ("label_noise", "drift_to", "drift_at", "drift_span")  # feedback options a session wraps on its own
_LOCK = threading.Lock()  # held while a component is built, so two sessions never build the same one twice
_PRIORS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_BATCHING: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_SOURCES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def options_key(options: dict[str, Any]) -> str:
    """A configuration section's options as one string: equal options, equal key."""
    return json.dumps(options, sort_keys=True, default=str)


def shared_prior(options: dict[str, Any], batch_window: float | None = None) -> Any:
    """The prior of ``options`` (``vars(cfg.prior)``): built on first use, then shared. With
    ``batch_window`` (seconds), the one :class:`~apa.priors.batching.BatchingPrior` around it that
    every session of this server shares, so their network calls are batched."""
    key = options_key(options)
    with _LOCK:
        prior = _PRIORS.get(key)
        if prior is None:
            prior = PRIORS.create(options["name"], options)
            _PRIORS[key] = prior
        if batch_window is None:
            return prior
        batching_key = f"{key}|{batch_window}"
        batching = _BATCHING.get(batching_key)
        if batching is None:
            batching = BatchingPrior(prior, batch_window)
            _BATCHING[batching_key] = batching
        return batching


def shared_feedback(options: dict[str, Any], prior: Any, prior_options: dict[str, Any]) -> Any:
    """The feedback source of ``options`` (``vars(cfg.feedback)``, PER_SESSION options aside) on ``prior``:
    built on first use, then shared by every session with the same feedback and prior options."""
    own = {k: v for k, v in options.items() if k not in PER_SESSION}
    key = options_key({"feedback": own, "prior": prior_options})
    with _LOCK:
        source = _SOURCES.get(key)
        if source is None:
            source = FEEDBACK.create(options["name"], options, prior)
            _SOURCES[key] = source
        return source


def open_count() -> tuple[int, int]:
    """(priors, feedback sources) alive in the caches now."""
    return len(_PRIORS), len(_SOURCES)


def build(cfg: AlignConfig, batch_window: float | None = None) -> tuple[Any, FeedbackSource | None]:
    """A session's prior and feedback source: the shared ones of its configuration (``batch_window``:
    the prior's network calls batched across sessions), wrapped in what is the session's own (label
    noise, a change of taste). Errors here happen before anything is written."""
    check_device(cfg.prior.device)
    prior = shared_prior(vars(cfg.prior), batch_window)
    check_prior(cfg, prior)
    source = shared_feedback(vars(cfg.feedback), prior, vars(cfg.prior))
    if cfg.feedback.label_noise and cfg.feedback.name == "human":
        raise SessionError("--label-noise simulates a user who errs; a person's own ratings are not flipped")
    noise, seed = cfg.feedback.label_noise, cfg.session.seed
    if cfg.feedback.drift_to is None:
        return prior, with_label_noise(source, noise, seed)
    after = shared_feedback({**vars(cfg.feedback), "prefer": cfg.feedback.drift_to}, prior, vars(cfg.prior))
    check_tastes(source, after)
    return prior, DriftingUser(with_label_noise(source, noise, seed), with_label_noise(after, noise, seed),
                               cfg.feedback.drift_at, cfg.feedback.drift_span, seed)
