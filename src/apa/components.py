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

from apa.registry import FEEDBACK, PRIORS

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
        from apa.priors.batching import BatchingPrior

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
