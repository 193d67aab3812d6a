"""⑥ What a session cannot run, refused before anything is written, each with what to change."""

from __future__ import annotations

from typing import Any

import torch

from apa.config import MAX_POPULATION, NUM_TIMESTEPS, AlignConfig
from apa.feedback.oracle import NUM_CLASSES


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
    if f.drift_at is not None and f.drift_at + f.drift_span > s.budget:
        raise SessionError(f"--drift-span {f.drift_span} from rating {f.drift_at} runs past the budget ({s.budget} "
                           "ratings): the change of taste would never complete; shorten --drift-span or raise --budget")
    if cfg.sampler.steps > NUM_TIMESTEPS:
        raise SessionError(f"--steps {cfg.sampler.steps} is past the prior's {NUM_TIMESTEPS} training timesteps; "
                           "lower it")


def validate_new(cfg: AlignConfig) -> None:
    """``validate``, and what only a session being created cannot have: a change of taste."""
    validate(cfg)
    if cfg.session.forget_before is not None:
        raise SessionError(f"--forget-before {cfg.session.forget_before}: a new session has no rounds to forget; "
                           "drop it, and give it with --resume when your taste changes")


def check_forget_before(store: Any, cfg: AlignConfig, budget: int, n: int) -> None:
    """Refuse a change of taste at round n (numbered from 1) that would change nothing, or the past:
    past the round after the last one; before a change already recorded (each is kept, so a later
    one may follow, never an earlier one); on a session with no refit left (finished, its budget
    spent), unless the budget is raised too, so that new rounds learn the new taste and redraw the
    final batch; and at the round after the last when no new round fits in the budget."""
    held, last = len(store.rounds()), cfg.session.forget_before
    if n > held + 1:
        raise SessionError(f"--forget-before {n}: this session has {held} round(s); forget the rounds before one "
                           f"of rounds 1 to {held + 1}")
    if last is not None and n < last:
        raise SessionError(f"--forget-before {n} goes back before the change of taste already recorded "
                           f"(--forget-before {last}); give round {last} or a later one (every change is kept)")
    open_round = store.open_round()
    spent = store.spent()
    if open_round is None and spent >= budget:
        raise SessionError(f"--forget-before {n}: this session is finished (its budget of {budget} ratings is "
                           "spent), so no round is left to learn the new taste from; give a --budget above "
                           f"{budget} too: the new rounds forget the earlier ones and redraw the final batch")
    pending = 0 if open_round is None else len(store.rounds()[open_round]["shown"]) - len(store.ratings(open_round))
    if n == held + 1 and spent + pending >= budget:
        raise SessionError(f"--forget-before {n} forgets every round so far, but no new round fits in the budget "
                           f"({budget} ratings); give a --budget above {budget} too")


def check_tastes(before: Any, after: Any) -> None:
    """Refuse a drifting user whose new taste is the old one, or every class (nothing left to dislike)."""
    if before.prefer is None or after.prefer is None:
        raise SessionError("--drift-to changes the classes a simulated user prefers; this feedback source names "
                           "no classes it prefers (use --feedback oracle)")
    old, new = set(before.prefer), set(after.prefer)
    if new and new == old:
        raise SessionError(f"--drift-to {','.join(map(str, sorted(new)))} is the taste --prefer already gives; "
                           "give the classes the user prefers after the change")
    if len(new) >= NUM_CLASSES:
        raise SessionError(f"--drift-to names every class ({NUM_CLASSES}): a user who likes everything rates "
                           "nothing apart; leave some classes out")


def check_device(device: str | None) -> None:
    """Refuse a --device this machine does not have (the configuration checked how it is spelled)."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, ...: a build may lack the module
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
    if cfg.surrogate.kind == "features" and prior.features is None:
        raise SessionError(f"--prior {cfg.prior.name} has no denoiser features; use --surrogate pixels")
