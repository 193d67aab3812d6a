"""⑥ What a session cannot run, refused before anything is written, each with what to change."""

from __future__ import annotations

from typing import Any

import torch

from apa.config import MAX_POPULATION, NUM_TIMESTEPS, AlignConfig
from apa.priors.base import HasFeatures


class SessionError(ValueError):
    """The session cannot run as configured; the message says what to change."""


def validate(cfg: AlignConfig) -> None:
    """The checks across sections (each section checks its own fields when it is built)."""
    s = cfg.session
    if s.budget < s.per_round:
        raise SessionError(f"--budget {s.budget} is below --per-round {s.per_round}: not even one round fits; "
                           "raise the budget or lower the images per round")
    if cfg.sampler.particles < s.per_round:
        raise SessionError(f"--particles {cfg.sampler.particles} is below --per-round {s.per_round}: "
                           "a round cannot show more particles than it samples")
    if cfg.sampler.particles > MAX_POPULATION:
        raise SessionError(f"--particles {cfg.sampler.particles} is past {MAX_POPULATION}, more than a session's "
                           "memory holds; lower it")
    f = cfg.feedback
    if f.drift_at is not None and f.name != "oracle":
        raise SessionError(f"--drift-to simulates an oracle user whose taste changes; it needs --feedback oracle, "
                           f"not {f.name}")
    if f.drift_at is not None and f.drift_at >= s.budget:
        raise SessionError(f"--drift-at {f.drift_at} is not before the end of the budget ({s.budget} ratings): "
                           "the taste would never change; lower --drift-at or raise --budget")
    if cfg.sampler.steps > NUM_TIMESTEPS:
        raise SessionError(f"--steps {cfg.sampler.steps} is past the prior's {NUM_TIMESTEPS} training timesteps; "
                           "lower it")


def check_device(device: str | None) -> None:
    """Refuse a --device this machine does not have (the configuration checked how it is spelled)."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        backend = getattr(torch, dev.type, None)
        present = dev.type == "cpu" or (backend is not None and backend.is_available()
                                        and (dev.index is None or dev.index < backend.device_count()))
    if not present:
        raise SessionError(f"--device {device}: this machine has no such device; use --device cpu, or none to "
                           "take a GPU when there is one")


def check_prior(cfg: AlignConfig, prior: Any) -> None:
    """Refuse a prior the rest of the configuration cannot use: every feedback source rates images
    [C, H, W], and the features surrogate reads the prior's denoiser."""
    if len(prior.event_shape) != 3:
        raise SessionError(f"--prior {cfg.prior.name} draws points of shape {tuple(prior.event_shape)}, not images, "
                           "so no feedback source can rate them (it serves the sampler's exactness tests); choose an "
                           "image prior such as mnist")
    if cfg.surrogate.kind == "features" and not isinstance(prior, HasFeatures):
        raise SessionError(f"--prior {cfg.prior.name} has no denoiser features; use --surrogate pixels")
