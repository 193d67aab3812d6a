"""⑥ FINAL: the aligned sampler's batch from the last surrogate, the session's result."""

from __future__ import annotations

from pathlib import Path

import torch

from apa import acquisition
from apa.priors.base import HasFeatures
from apa.priors.calls import counting
from apa.seeding import generator
from apa.smc.sampler import device_of, renoised


class FinalBatch:
    """The final batch: a part of :class:`apa.session.Session` (reads its store, cfg, prior, timer)."""

    def final_samples(self, n: int | None = None) -> torch.Tensor:
        """The aligned sampler's evaluation batch, resampled to equal weights: images [n, C, H, W]."""
        sc = self.cfg.session
        n = n or sc.eval_samples
        last = len(self.store.rounds()) - 1
        surrogate = self.surrogate_after(last, device_of(self.prior))
        seed = sc.seed
        initial, start = self.final_start(n, generator(seed, last + 1, "restart"))
        with self.timer("final_sampling"):
            res = self.sample(surrogate, n, generator(seed, last + 1, "final"), initial=initial, start_step=start,
                              desc="final batch")
        particles = res.resample(n, generator(seed, last + 1, "select"))
        if sc.final_move is not None:
            with self.timer("final_sampling"):
                particles = moved(self.prior, self.reward(surrogate), particles, sc.final_move,
                                  self.cfg.sampler.beta[1], self.cfg.sampler.steps, generator(seed, last + 1, "move"))
        with torch.no_grad():
            return self.prior.decode(particles).cpu()

    def final_start(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor | None, int]:
        """Where the final batch starts: the noise end (None, 0), or, with ``final_start="liked"``,
        n draws from the liked rated particles noised to σ_k, k = steps − round(restart·steps):
        z = x0 + σ_k·ξ ([n, *event], k). The sampler then targets the prior's plain sampler from
        those particles tilted by exp(β_end·r): best-of-N's refinement, reweighted by the surrogate.
        ``"balanced"`` draws the liked particles with weights ∝ 1/local density in the prior's feature
        space, so a liked mode the rounds showed rarely starts as many particles as a crowded one."""
        sc, steps = self.cfg.session, self.cfg.sampler.steps
        if sc.final_start == "noise":
            return None, 0
        x, y = self.training_data()
        liked = x[y > 0]
        k = steps - round(sc.restart * steps)
        if liked.shape[0] == 0 or k <= 0:
            return None, 0  # nothing liked yet: the noise end
        sigma = float(self.prior.sigmas(steps)[k])
        if sc.final_start == "balanced":
            w = acquisition.balanced_weights(self.start_features(liked))
            pick = liked[torch.multinomial(w, n, replacement=True, generator=gen)]
        else:
            pick = liked[torch.randint(0, liked.shape[0], (n,), generator=gen)]
        return pick + sigma * torch.randn(pick.shape, generator=gen).to(pick), k

    def start_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the balanced restart measures crowding in: the prior's denoiser features where it has
        them (the surrogate's input), else the particles themselves. [m, *event] -> [m, d]."""
        with torch.no_grad():
            if isinstance(self.prior, HasFeatures):
                return self.prior.features(x, self.cfg.surrogate.feature_t)
            return x.reshape(x.shape[0], -1)

    def save_final(self, n: int | None = None, images: torch.Tensor | None = None) -> Path:
        """Draw the final batch (or take ``images`` already drawn) and store it; returns its path."""
        return self.store.save_final(self.final_samples(n) if images is None else images)

    def finish(self) -> Path:
        """The lifecycle's FINAL step for a person's session: store the final batch, then measure and
        record what the report shows of it (``evaluation/records``); returns the batch's path."""
        from apa.evaluation.records import record_final

        with counting() as calls:
            images = self.final_samples()
        path = self.save_final(images=images)
        with self.timer("evaluation"):
            record_final(self, images, calls.total)
        self.store.save_record("timings", dict(self.timings))  # a resumed session's report keeps them
        return path


@torch.no_grad()
def moved(prior, reward, x0: torch.Tensor, t: int, beta: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """One Metropolis-Hastings move of each particle x0 [n, *event] toward p·exp(β·r): the proposal x' is x
    re-noised to timestep t and denoised (:func:`renoised`; a move that leaves the prior's law invariant
    when the denoiser is exact), accepted with probability min(1, exp(β·(r(x') − r(x)))). Resampling
    leaves copies of the heavy particles that the last, nearly noise-free steps cannot separate; an
    accepted move turns a copy into a new image near it, and the tilted law stays the target."""
    proposal = renoised(prior, x0, t, steps, gen)
    log_ratio = beta * (reward(proposal).reshape(-1) - reward(x0).reshape(-1)).double()
    accept = torch.rand(x0.shape[0], generator=gen, dtype=torch.float64).log().to(log_ratio) < log_ratio
    return torch.where(accept.reshape(-1, *[1] * (x0.dim() - 1)), proposal, x0)
