"""⑥ FINAL: where the final batch starts, the cut of its tilt, and the move that turns its copies into new
images."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from apa.config import AlignConfig
from apa.measures.yields import kept_greedily
from apa.session import acquisition
from apa.smc.sampler import renoised


def final_start(prior, cfg: AlignConfig, liked: torch.Tensor, n: int, gen: torch.Generator
                ) -> tuple[torch.Tensor | None, int]:
    """Where the final batch starts: the noise end (None, 0), or, with ``final_start="liked"``, n draws
    from the liked rated particles ``liked`` [m, *event] noised to σ_k, k = steps − round(restart·steps):
    z = x0 + σ_k·ξ ([n, *event], k). The sampler then targets the prior's plain sampler from those
    particles tilted by exp(β_end·r): best-of-N's refinement, reweighted by the surrogate.
    ``"balanced"`` draws the liked particles with weights ∝ 1/local density in the prior's feature
    space, so a liked mode the rounds showed rarely starts as many particles as a crowded one."""
    sc, steps = cfg.session, cfg.sampler.steps
    if sc.final_start == "noise":
        return None, 0
    k = steps - round(sc.restart * steps)
    if liked.shape[0] == 0 or k <= 0:
        return None, 0  # nothing liked yet: the noise end
    sigma = float(prior.sigmas(steps)[k])
    if sc.final_start == "balanced":
        w = acquisition.balanced_weights(start_features(prior, cfg.surrogate.feature_t, liked))
        pick = liked[torch.multinomial(w, n, replacement=True, generator=gen)]
    else:
        pick = liked[torch.randint(0, liked.shape[0], (n,), generator=gen)]
    return pick + sigma * torch.randn(pick.shape, generator=gen).to(pick), k


CUT_SAMPLES = 128  # plain prior samples that set --final-cut's threshold


Cut = tuple[float, float, float]  # (τ, s, β) of --final-cut's tilt


def cut_at(reward: Callable[[torch.Tensor], torch.Tensor], plain: torch.Tensor, q: float, beta: float) -> Cut:
    """Where ``--final-cut`` cuts the tilt exp(β·r) to the top share q of the prior by r: τ, the (1 − q)
    quantile of r over the plain prior samples ``plain`` [m, *event]; s, a quarter of the spread between the
    (1 − 1.25·q) quantile and τ (the scale of r just below the cut: r = log P(liked | x) is steep there, the
    top of a common taste's prior holding P near 1); and β."""
    with torch.no_grad():
        r = reward(plain).double().cpu()
    tau, low = torch.quantile(r, 1.0 - q), torch.quantile(r, max(0.0, 1.0 - 1.25 * q))
    return float(tau), float((tau - low).clamp_min(1e-6)) / 4.0, float(beta)


def with_cut(reward: Callable[[torch.Tensor], torch.Tensor], cut: Cut | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``reward`` r with its tilt cut (``cut_at``; None: r itself): r'(x) = r(x) + log σ((r(x) − τ)/s) / β, so
    exp(β·r') = exp(β·r)·σ((r − τ)/s): the tilt kept above τ, halved at τ, down by e^-4 at the (1 − 1.25·q)
    quantile and by e^-4 more every spread below. Smooth, so the sampler's drift has a gradient."""
    if cut is None:
        return reward
    tau, s, beta = cut
    return lambda z: (v := reward(z)) + F.logsigmoid((v - tau) / s) / beta


def start_features(prior, feature_t: float, x: torch.Tensor) -> torch.Tensor:
    """What the balanced restart measures crowding in: the prior's denoiser features where it has
    them (the surrogate's input), else the particles themselves. [m, *event] -> [m, d]."""
    with torch.no_grad():
        if prior.features is not None:
            return prior.features(x, feature_t)
        return x.reshape(x.shape[0], -1)


@torch.no_grad()
def moved(prior, reward, x0: torch.Tensor, t: int, beta: float, steps: int, gen: torch.Generator,
          sweeps: int = 1) -> torch.Tensor:
    """``sweeps`` Metropolis-Hastings moves of each particle x0 [n, *event] toward p·exp(β·r): the proposal x'
    is x re-noised to timestep t and denoised (:func:`renoised`; a move that leaves the prior's law invariant
    when the denoiser is exact), accepted with probability min(1, exp(β·(r(x') − r(x)))). Resampling
    leaves copies of the heavy particles that the last, nearly noise-free steps cannot separate; an
    accepted move turns a copy into a new image near it, and the tilted law stays the target. r(x) is read
    once and carried from sweep to sweep: each sweep costs the proposal's steps and one reward row."""
    if x0.shape[0] == 0:
        return x0
    x, r = x0, reward(x0).reshape(-1)
    for _ in range(sweeps):
        proposal = renoised(prior, x, t, steps, gen)
        r_new = reward(proposal).reshape(-1)
        log_ratio = beta * (r_new - r).double()
        accept = torch.rand(x.shape[0], generator=gen, dtype=torch.float64).log().to(log_ratio) < log_ratio
        x = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), proposal, x)
        r = torch.where(accept, r_new, r)
    return x


REPEAT_SHARE = 0.5  # an image nearer another than this share of the kept images' median spacing repeats it
YARDSTICK_READS = 8  # at most this many reads of that median, each over the images the last one kept


def repeats(x: torch.Tensor, share: float = REPEAT_SHARE, seen: torch.Tensor | None = None,
            within: float | None = None) -> torch.Tensor:
    """bool [n]: the particles x [n, *event] that repeat one kept before them, read greedily in batch order:
    nearer (L2, in the particles' own space) than ``share`` of the median nearest-other distance among the
    images that repeat no other (:func:`repeat_line`). Independent draws of a taste lie near that median; an
    exact copy (distance 0) or a sibling split in the last steps lies far below it. Scale-free, so it needs no
    yardstick from outside the batch. With ``seen`` [m, *event] (the rated particles) and ``within`` (None: no
    such rule), a particle within ``within`` of one of them repeats it too, and is never the one another
    repeats."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool)
    flat = x.reshape(n, -1).double().cpu()
    d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")  # an exact copy is 0 apart
    d.fill_diagonal_(float("inf"))
    threshold = repeat_line(d, share)
    near = seen_distance(flat, seen) <= within if within is not None else torch.zeros(n, dtype=torch.bool)
    d[:, near] = float("inf")
    return ~kept_greedily(d, threshold) | near


def repeat_line(d: torch.Tensor, share: float = REPEAT_SHARE) -> float:
    """The distance below which an image repeats another, from the pairwise distances d [n, n] (diagonal inf):
    ``share`` of the median nearest-other distance, read first over the whole batch and then over the images
    kept at the line it gives, until the kept images stop changing (at most YARDSTICK_READS reads). Over the
    whole batch alone, a batch more than half of which repeats has a median near 0, and its line then catches
    only exact copies; the kept images are the batch's independent draws, whose spacing the line is for."""
    keep = torch.ones(d.shape[0], dtype=torch.bool)
    line = 0.0
    for _ in range(YARDSTICK_READS):
        line = share * float(d[keep][:, keep].min(dim=1).values.median())
        kept = kept_greedily(d, line)
        if torch.equal(kept, keep) or int(kept.sum()) < 2:
            break
        keep = kept
    return line


def seen_distance(x: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """float64 [n]: each particle's L2 distance to the nearest of ``seen`` [m, *event] (inf with none)."""
    if seen is None or seen.shape[0] == 0:
        return torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    return torch.cdist(x.reshape(x.shape[0], -1).double().cpu(), seen.reshape(seen.shape[0], -1).double().cpu()
                       ).min(dim=1).values


@torch.no_grad()
def unrepeated(prior, reward, x: torch.Tensor, t: int, beta: float, steps: int, gen: torch.Generator,
               times: int, seen: torch.Tensor | None = None, unseen: float = 0.0) -> torch.Tensor:
    """Up to ``times`` more single moves (:func:`moved`) of the particles x [n, *event] that still
    :func:`repeats` another, found anew before each: only the repeats pay, and each move leaves the tilted
    law invariant as the sweeps do. Stops early once none repeats. With ``unseen`` > 0, the share of the
    batch nearest the rated particles ``seen`` (that share's quantile of :func:`seen_distance`, read once
    before the first pass) repeats them too, until moved farther."""
    near = seen_distance(x, seen) if unseen > 0 else None
    within = float(torch.quantile(near, unseen)) if near is not None and bool(near.isfinite().any()) else None
    for _ in range(times):
        again = repeats(x, seen=seen, within=within).to(x.device)
        if not bool(again.any()):
            break
        x = x.clone()
        x[again] = moved(prior, reward, x[again], t, beta, steps, gen)
    return x
