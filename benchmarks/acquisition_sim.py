"""Which rule for what a round shows leaves the surrogate whose tilt holds the most liked, distinct images:
whole sessions simulated on the benchmark's plain prior samples, many seeds in minutes.

A simulated session has the real one's shape and settings (its user, its surrogate and fitting, 80
ratings in rounds of 8, round 1 half plain, β_end 2) but draws no particles: the reference pool is split
in two halves. A round's population is 32 draws from the first half by the tilt P(liked | x)^β of the
surrogate fitted so far (what a round's sampler targets), the rule picks 8 distinct of them, and the
user (the oracle, label noise 0) rates them. After the last round, the final surrogate's exact target is
read on the second half, as ``tilt_probe.py`` does: liked shares (oracle, judge), the rarest liked class,
the expected distinct images and yield of 256. Beside them: the shown images liked from round 3 on and
the rating that first liked an image.

Rules (what a round shows of its population):

- ``random``: 8 distinct particles at random (the default's ``--acquisition random``);
- ``weighted``: 8 distinct drawn by weight without replacement (``--acquisition weighted``);
- ``unsure``: the 8 distinct particles whose P(liked | x) is nearest 1/2;
- ``half``: 4 at random, then the 4 nearest 1/2 of the rest;
- ``thompson``: the population is drawn by the tilt of a surrogate fitted to a bootstrap resample of the
  ratings (a draw from the surrogate's uncertainty; no extra network calls in a real session), shown at
  random; the final target keeps the surrogate fitted to every rating;
- ``retry``: ``random``, but a round after a tilted round whose tilted images the user liked none of shows
  half its images by the search (below) instead: a tilt that finds nothing the user likes is not trusted
  alone (a session's ``--search-on-miss 0.5``);
- ``confirm``: ``random``, but until the user has liked ``CONFIRM`` images every round shows half by the
  search: one like (perhaps an erring one) does not end the search.

Before the user's first like every rule searches as ``--search`` says: ``farthest`` (the default's: of 32
plain samples, the 8 farthest in the surrogate's features from every image rated) or ``plain``.
``--label-noise q`` flips each rating with probability q (the user errs); what the rounds showed, and the
first liked image, are counted by the user's true taste.

The pool is the sampler's target only approximately (a finite pool stands in for the prior), so this
screens rules against each other; whole sessions decide.

  python benchmarks/acquisition_sim.py runs/yield2_mnist/mnist_p0_n0_s0 ... \\
      --reference runs/yield2_mnist/reference_mnist_25_4096.pt --rules random,unsure,thompson --seeds 4
  python benchmarks/acquisition_sim.py ... --rules random,retry,confirm --seeds 6 --label-noise 0.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_results import LATE_ROUND, copied_session, first_liked, pool_labels  # noqa: E402
from tilt_probe import measures  # noqa: E402

from apa.session.acquisition import farthest_from  # noqa: E402
from apa.surrogate.fit import FitConfig, fit  # noqa: E402
from apa.surrogate.model import Ensemble, FeatureSurrogate  # noqa: E402

POPULATION, SHOWN, ROUNDS, BETA = 32, 8, 10, 2.0
RULES = ("random", "weighted", "unsure", "half", "thompson", "retry", "confirm")
CONFIRM = 3
KEYS = ("judge_share", "oracle_share", "rarest", "distinct", "judge_yield", "shown_late", "first_liked")


def generator(*parts) -> torch.Generator:
    """A generator of its own for each tuple of names and numbers."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def fitted(feats: torch.Tensor, y: torch.Tensor, settings, seed: int, tag: str) -> torch.Tensor:
    """The session's surrogate (its loss and fitting) on features [n, D] and ratings y [n] in {-1, 1}:
    a function features [m, D] -> log P(liked) [m] (float64)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator(seed, tag, "init").initial_seed())
        model = Ensemble([FeatureSurrogate(lambda f: f, feats.shape[1])], settings.loss).eval()
    fit(model, feats, y, FitConfig(settings.epochs, settings.batch_size, settings.lr), generator(seed, tag, "fit"))
    model.requires_grad_(False)
    return lambda f: model(f).double()


def population(log_p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """POPULATION draws [k] (indices into log_p's pool, with repeats) by the tilt P^β."""
    return torch.multinomial(torch.softmax(BETA * log_p, 0), POPULATION, replacement=True, generator=gen)


def show(rule: str, drawn: torch.Tensor, log_p: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct pool indices of the population ``drawn`` [POPULATION] by ``rule``; log_p is the pool's [n]."""
    uniq, counts = drawn.unique(return_counts=True)
    if rule in ("random", "thompson", "retry", "confirm"):
        return uniq[torch.randperm(uniq.numel(), generator=gen)[:k]]
    if rule == "weighted":
        return uniq[torch.multinomial(counts.double(), min(k, uniq.numel()), replacement=False, generator=gen)]
    unsure = (log_p[uniq].exp() - 0.5).abs()
    if rule == "unsure":
        return uniq[torch.argsort(unsure, stable=True)[:k]]
    first = torch.randperm(uniq.numel(), generator=gen)[:k // 2]
    rest = torch.ones(uniq.numel(), dtype=torch.bool)
    rest[first] = False
    others = rest.nonzero().flatten()
    return uniq[torch.cat([first, others[torch.argsort(unsure[others], stable=True)[:k - first.numel()]]])]


def simulate(rule: str, feats: torch.Tensor, liked: torch.Tensor, rounds_pool: torch.Tensor, settings,
             seed: int, search: str = "farthest", said: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, list[float], list[float]]:
    """One session on the pool: (the final surrogate's log P [n] over every pool image, per-round liked share of
    what was shown, every rating in order as 1 or 0, by the true taste). ``rounds_pool`` [m] are the indices
    rounds may draw from; ``said`` [n] is what the user answers for each image (``liked`` unless the user errs)."""
    said = liked if said is None else said
    gen = generator(seed, rule, "sim")
    free = torch.zeros(feats.shape[0], dtype=torch.bool)
    free[rounds_pool] = True
    rated: list[int] = []
    shares: list[float] = []
    score, tilted_liked = None, True
    for r in range(ROUNDS):
        candidates = free.nonzero().flatten()
        plain_gen = generator(seed, r, "plain")  # the plain samples are the same under every rule
        likes = int(said[torch.tensor(rated, dtype=torch.long)].sum()) if rated else 0
        if score is None:  # round 0: plain prior samples
            pick = candidates[torch.randperm(candidates.numel(), generator=plain_gen)[:SHOWN]]
        elif likes == 0:  # before the first like: the search
            pick = searched(candidates, feats, rated, SHOWN, search, plain_gen)
        else:
            plain = SHOWN // 2 if r == 1 else 0  # round 1 explores: half plain, as the session does
            hunting = (rule == "retry" and not tilted_liked) or (rule == "confirm" and likes < CONFIRM)
            hunt = SHOWN // 2 if hunting else 0
            steer = score
            if rule == "thompson":
                boot = torch.tensor(rated)[torch.randint(0, len(rated), (len(rated),), generator=gen)]
                steer = fitted(feats[boot], labels(said, boot), settings, seed, f"boot{r}")
            log_p = steer(feats[candidates])
            chosen = candidates[show(rule, population(log_p, gen), log_p, SHOWN - plain - hunt, gen)]
            tilted_liked = bool(said[chosen].any())
            left = candidates[~torch.isin(candidates, chosen)]
            if hunt:
                more = searched(left, feats, rated + chosen.tolist(), hunt, search, plain_gen)
            else:
                more = left[torch.randperm(left.numel(), generator=plain_gen)[:plain]]
            pick = torch.cat([chosen, more])
        free[pick] = False
        rated.extend(pick.tolist())
        shares.append(float(liked[pick].float().mean()))
        idx = torch.tensor(rated)
        score = fitted(feats[idx], labels(said, idx), settings, seed, f"r{r}")
    return score(feats), shares, [float(v) for v in liked[torch.tensor(rated)]]


def searched(candidates: torch.Tensor, feats: torch.Tensor, rated: list[int], k: int, search: str,
             gen: torch.Generator) -> torch.Tensor:
    """k pool indices of a search round: of POPULATION plain samples from ``candidates``, k at random
    (``plain``) or the k farthest from every rated image (``farthest``), in the features ``feats`` [n, D]."""
    plain = candidates[torch.randperm(candidates.numel(), generator=gen)[:POPULATION]]
    if search == "plain":
        return plain[:k]
    seen = feats[torch.tensor(rated, dtype=torch.long)]
    return plain[farthest_from(feats[plain].double(), seen.double(), k)]


def labels(liked: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The ratings of pool images idx [k] as targets: +1 where ``liked`` [n] (what the user answers) holds,
    −1 else."""
    return liked[idx].float() * 2.0 - 1.0


def session_rows(src: str, reference: torch.Tensor, rules: list[str], seeds: int, search: str = "farthest",
                 noise: float = 0.0) -> dict[str, list[dict]]:
    with copied_session(src) as s:
        pool = pool_labels(s, reference)
        with torch.no_grad():
            feats = torch.cat([s.prior.features(z, s.cfg.surrogate.feature_t) for z in reference.split(256)])
    liked = pool.liked["oracle"]
    rows: dict[str, list[dict]] = {rule: [] for rule in rules}
    for k in range(seeds):
        order = torch.randperm(feats.shape[0], generator=generator(k, "split"))
        half = order.numel() // 2
        rounds_pool, target = order[:half], order[half:]
        flip = torch.rand(feats.shape[0], generator=generator(k, "noise")) < noise
        said = liked ^ flip
        for rule in rules:
            log_p, shares, ratings = simulate(rule, feats, liked, rounds_pool, s.cfg.surrogate, k, search, said)
            row = measures(BETA * log_p[target], {by: m[target] for by, m in pool.liked.items()},
                           None if pool.classes is None else pool.classes[target], pool.prefer)
            row["shown_late"] = statistics.mean(shares[LATE_ROUND:])
            found = first_liked(ratings)
            row["first_liked"] = float(found if found is not None else len(ratings) + 1)
            rows[rule].append(row)
            print(f"| {Path(src).name} | {k} | {rule} | " + " | ".join(cell(key, row) for key in KEYS) + " |",
                  flush=True)
    return rows


def cell(key: str, row: dict) -> str:
    if key not in row:
        return ""
    return f"{row[key]:.0f}" if key in ("distinct", "judge_yield", "first_liked") else f"{row[key]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories: their user, prior and settings")
    ap.add_argument("--reference", required=True, help="the benchmark's plain prior particles (.pt)")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--seeds", type=int, default=4, help="simulated sessions per directory and rule")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--search", choices=("farthest", "plain"), default="farthest",
                    help="what rounds show before the first like")
    ap.add_argument("--label-noise", type=float, default=0.0, help="the share of ratings the user gets wrong")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rules = args.rules.split(",")
    if unknown := set(rules) - set(RULES):
        raise SystemExit(f"unknown rules {sorted(unknown)}; choose from {', '.join(RULES)}")
    reference = torch.load(args.reference)
    print("| taste | seed | rule | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 3), flush=True)
    every: dict[str, dict[str, list[dict]]] = {}
    for src in args.sessions:
        every[Path(src).name] = session_rows(src, reference, rules, args.seeds, args.search, args.label_noise)
    print("\nmean per taste (over seeds):\n| taste | rule | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 2))
    for name, by_rule in every.items():
        for rule, rows in by_rule.items():
            mean = {k: statistics.mean(r[k] for r in rows) for k in KEYS if all(k in r for r in rows)}
            print(f"| {name} | {rule} | " + " | ".join(cell(k, mean) for k in KEYS) + " |")


if __name__ == "__main__":
    main()
