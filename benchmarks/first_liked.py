"""Finding a rare taste before anything is liked: how many ratings until the first liked image, when
each round shows k images chosen from a pool of plain prior samples by one rule.

Until the person likes something there is nothing to steer by, so the rounds can only search. This
benchmark measures the search alone, offline, on a fixed set of plain prior samples (the benchmark's
reference particles): each trial deals every round a fresh pool of P samples (without replacement
from the reference), a rule picks k of them, the simulated user rates them, and the trial ends at
the first liked rating. Rules:

- ``random``: k of the pool at random (what a plain-prior round shows; P does not matter);
- ``farthest``: greedy farthest points in the prior's feature space, from every image already rated
  and from each other (coverage: the next image is the one least like anything seen);
- ``farthest-pixels``: the same in pixel space;
- ``mixed``: half by ``cover``, half by ``farthest``;
- ``cover`` (``cover-pixels``): greedy facility location: typical images of the regions of the pool
  that nothing rated resembles yet;
- ``tilt``: what a default session's rounds do before anything is liked: the surrogate (the session's
  own, on the prior's features) fitted to the dislikes so far, the round's population POPULATION draws
  from the pool by its P(liked | x)^2, k distinct of them shown at random (round 1 shows half plain, as
  ``--explore`` does).

Printed per taste and rule: P(first liked within 40 ratings) over the trials with its binomial
standard error, the median ratings to the first liked image, and the network-call rows per round
(P samples at S steps, ε and one features pass each). The plain prior's 1 − (1 − p)^40 is the
yardstick.

  python benchmarks/first_liked.py --taste style:7:thick style:3:slant-right like:400,437,468 \\
      --pool 8,64,256 --trials 400
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_results import job_config, reference_particles  # noqa: E402  (the yield benchmark's own setup)

from apa.measures.novelty import users_liked  # noqa: E402
from apa.session.acquisition import farthest_from  # noqa: E402
from apa.session import components  # noqa: E402

BUDGET = 40


def cover_order(pool: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
    """k indices into ``pool`` [P, D] chosen greedily to cover the pool (facility location): each adds
    the most Σ_j max_c s(j, c) over pool points j and chosen or seen points c, s = exp(−d²/h²), h the
    median distance from a pool point to its nearest other. Picks typical images of regions nothing
    seen resembles yet, where ``farthest`` picks the outliers."""
    d = torch.cdist(pool, pool)
    h2 = d.masked_fill(torch.eye(pool.shape[0], dtype=torch.bool), float("inf")).min(1).values.median().square()
    sim = torch.exp(-d.square() / h2.clamp_min(1e-12))
    best = (torch.exp(-torch.cdist(pool, seen).square() / h2).max(1).values if seen.shape[0]
            else torch.zeros(pool.shape[0], dtype=pool.dtype))
    chosen: list[int] = []
    for _ in range(min(k, pool.shape[0])):
        gain = (sim - best[:, None]).clamp_min(0).sum(0)  # [P]: what each candidate adds
        gain[chosen] = -1.0
        nxt = int(torch.argmax(gain))
        chosen.append(nxt)
        best = torch.maximum(best, sim[:, nxt])
    return torch.tensor(chosen, dtype=torch.long)


def mixed_order(pool: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
    """Half the k by ``cover`` (typical images of unseen regions), then the rest by ``farthest``
    (outliers) from everything seen and chosen."""
    first = cover_order(pool, seen, (k + 1) // 2)
    rest = torch.ones(pool.shape[0], dtype=torch.bool)
    rest[first] = False
    left = torch.nonzero(rest).squeeze(1)
    more = left[farthest_from(pool[left], torch.cat([seen, pool[first]]), k - first.shape[0])]
    return torch.cat([first, more])


def tilt_order(settings, seed: int):
    """The ``tilt`` rule: pool [P, D] and seen [m, D] features -> k indices into the pool."""
    from acquisition_sim import fitted, population

    def order(pool: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 7919 + seen.shape[0])
        if seen.shape[0] == 0:
            return torch.arange(k)  # round 0: the pool is in random order
        log_p = fitted(seen.float(), -torch.ones(seen.shape[0]), settings, seed, f"dislikes{seen.shape[0]}")(
            pool.float())
        plain = k // 2 if seen.shape[0] == k else 0  # round 1 explores: half plain
        uniq = population(log_p, gen).unique()
        tilted = uniq[torch.randperm(uniq.numel(), generator=gen)[:k - plain]]
        rest = torch.ones(pool.shape[0], dtype=torch.bool)
        rest[tilted] = False
        return torch.cat([tilted, rest.nonzero().flatten()[:k - tilted.numel()]])

    return order


def first_liked(liked: torch.Tensor, space: torch.Tensor | None, pool: int, k: int, gen: torch.Generator,
                order_rule=None) -> int | None:
    """Ratings until the first liked image (1-based), or None within the budget. ``liked`` [M] bool of
    the reference; ``space`` [M, D] the coordinates a farthest rule uses (None: random)."""
    order = torch.randperm(liked.shape[0], generator=gen)
    seen: list[int] = []
    for r in range(math.ceil(BUDGET / k)):
        deal = order[r * pool:(r + 1) * pool]
        if space is None:
            shown = deal[:k]
        else:
            past = space[torch.tensor(seen, dtype=torch.long)] if seen else space[:0]
            shown = deal[order_rule(space[deal], past, k)]
        for j, i in enumerate(shown.tolist()):
            if liked[i]:
                return len(seen) + 1
            seen.append(i)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="mnist", choices=("mnist", "fashion"))
    ap.add_argument("--taste", nargs="+", default=["style:7:thick", "style:3:slant-right", "like:400,437,468"])
    ap.add_argument("--pool", default="8,64,256", help="comma list of pool sizes per round")
    ap.add_argument("--rules", default="random,farthest,farthest-pixels")
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--out", default="runs/first_liked", help="where the reference particles are kept")
    args = ap.parse_args()
    steps = 25
    reference = torch.load(reference_particles(Path(args.out), args.prior, steps))
    print(f"| taste | prior share | rule | pool per round | P(first liked ≤ {BUDGET}) | median ratings | "
          f"call rows per round |\n|---|---|---|---|---|---|---|", flush=True)
    for taste in args.taste:
        cfg = job_config(args.prior, taste, 0.0, 0, {})
        prior, user = components.build(cfg)
        settings = cfg.surrogate
        with torch.no_grad():
            images = prior.decode(reference)
            liked = users_liked(user, images)
            feats = torch.cat([prior.features(reference[i:i + 256]) for i in range(0, reference.shape[0], 256)])
        p = float(liked.double().mean())
        spaces = {"random": (None, None), "farthest": (feats.double(), farthest_from),
                  "farthest-pixels": (images.flatten(1).double(), farthest_from),
                  "cover": (feats.double(), cover_order), "cover-pixels": (images.flatten(1).double(), cover_order),
                  "mixed": (feats.double(), mixed_order), "tilt": (feats, None)}
        print(f"| {taste} | {p:.3f} | plain prior, 1 − (1 − p)^{BUDGET} | – | {1 - (1 - p) ** BUDGET:.2f} | – | – |")
        for rule in args.rules.split(","):
            for pool in [int(x) for x in args.pool.split(",")]:
                if rule == "random" and pool != args.per_round:
                    continue
                found = [first_liked(liked, spaces[rule][0], pool, args.per_round, torch.Generator().manual_seed(t),
                                     tilt_order(settings, t) if rule == "tilt" else spaces[rule][1])
                         for t in range(args.trials)]
                hit = sum(f is not None for f in found) / len(found)
                se = math.sqrt(hit * (1 - hit) / len(found))
                ranks = sorted(f if f is not None else BUDGET + 1 for f in found)
                median = ranks[len(ranks) // 2]
                print(f"| {taste} | {p:.3f} | {rule} | {pool} | {hit:.2f} ± {se:.2f} | "
                      f"{median if median <= BUDGET else f'> {BUDGET}'} | {pool * (steps + 1) + pool:,} |",
                      flush=True)


if __name__ == "__main__":
    main()
