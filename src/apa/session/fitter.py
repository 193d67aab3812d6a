"""⑥ FIT: a fresh surrogate, fitted on the ratings a session remembers, and the reward the sampler reads.

The surrogate after round r is stored with the round, so a resumed session (and every torchrun
rank, from the parameters rank 0 broadcasts) rebuilds it with :meth:`SurrogateFitter.load`.
"""

from __future__ import annotations

from typing import Callable

import torch

from apa.config import SurrogateConfig
from apa.seeding import generator, seeded_global
from apa.session.checks import SessionError
from apa.smc.sampler import zero_reward
from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate, LatentSurrogate

Reward = Callable[[torch.Tensor], torch.Tensor]  # particles [N, *event] -> r(x) [N]


class SurrogateFitter:
    """Builds, fits and loads the surrogate of one session: ``prior`` (its denoiser features are the
    surrogate's input, or its event shape the pixels'), the surrogate's configuration, the session's seed."""

    def __init__(self, prior, cfg: SurrogateConfig, seed: int):
        if cfg.kind == "features" and prior.features is None:
            raise SessionError("the prior has no denoiser features; use --surrogate pixels")
        self.prior, self.cfg, self.seed = prior, cfg, seed

    def new(self, r: int) -> Ensemble:
        """Fresh members, initialised from (seed, round): [M] surrogates of the configured kind."""
        sc = self.cfg
        if sc.kind == "features":
            fn = lambda x: self.prior.features(x, sc.feature_t)  # noqa: E731
            dim = int(fn(torch.zeros(1, *self.prior.event_shape)).shape[1])
        with seeded_global(self.seed, r, "init"):
            if sc.kind == "features":
                members = [FeatureSurrogate(fn, dim) for _ in range(sc.ensemble)]
            else:
                members = [LatentSurrogate(self.prior.event_shape[0]) for _ in range(sc.ensemble)]
        return Ensemble(members, sc.loss).eval()

    def load(self, r: int, state: dict[str, torch.Tensor], device: torch.device | str | None = None) -> Ensemble:
        """The surrogate fitted after round r, from its parameters, frozen, on ``device`` (default CPU)."""
        model = self.new(r)
        model.load_state_dict(state)
        return model.requires_grad_(False).to(device or "cpu")

    def fit(self, r: int, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> tuple[Ensemble, float]:
        """A fresh surrogate fitted after round r on particles x [n, *event], targets y [n] in [-1, 1]
        and weights w [n] (None: all 1): (the model, its final loss)."""
        model, sc = self.new(r), self.cfg
        loss = fit(model, x, y, FitConfig(sc.epochs, sc.batch_size, sc.lr), generator(self.seed, r, "fit"), w)
        return model, loss

    def reward(self, surrogate: Ensemble | None) -> Reward:
        """The sampler's reward: zero before any feedback; log P(liked | x) for the logistic surrogate;
        the mse surrogate's rating capped at ``ceiling`` (on the [-1, 1] scale). The cap keeps the
        surrogate's noise among images it already rates as liked from being amplified by exp(β·r)
        into a collapse onto one class; log P(liked | x) saturates at 0 by itself."""
        if surrogate is None:
            return zero_reward
        ceiling = self.cfg.ceiling
        if surrogate.loss != "mse" or ceiling is None:
            return surrogate
        return lambda z: surrogate(z).clamp(max=ceiling)


def heldout_score(surrogate: Ensemble | None, x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
    """How well the surrogate fitted before a round predicted its ratings before seeing them: particles
    x [n, *event], targets y [n] in [-1, 1]. The share on the same side of 0 (accuracy), the mean
    absolute error, and n; None when there is nothing to score."""
    if surrogate is None or y.shape[0] == 0:
        return None
    with torch.no_grad():
        pred = surrogate.rating(x).reshape(-1).float().cpu()
    return {"accuracy": float(((pred > 0) == (y > 0)).float().mean()), "mae": float((pred - y).abs().mean()),
            "n": int(y.shape[0])}


def reads_as_change(threshold: float | None, heldout: dict[str, float] | None, before: list[float]) -> bool:
    """A round reads as a change of taste: the surrogate fitted before it agreed with at most
    ``threshold`` of its ratings, after agreeing with at least 1 − threshold of the two rounds before it
    (``before``: their held-out accuracies since the last change): a surrogate that was right and is
    now wrong, not one still learning."""
    if threshold is None or heldout is None or heldout["accuracy"] > threshold:
        return False
    return len(before) == 2 and sum(before) / 2 >= 1.0 - threshold
