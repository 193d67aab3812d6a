"""Does the yield's repeat rule call independent images repeats? The prior's own samples, split in two.

For each class set, the simulated user's liked prior samples (of 2,048 plain samples, drawn once per
machine) are split in halves: the first sets the repeat threshold (``evaluation.yields``), the
second, independent of it, is counted; a rule read on the right side keeps about 99% of them
distinct. A batch made of 50 of them twice must count 50 (or the rule misses exact repeats).

  python benchmarks/yield_yardstick.py --prefer 1 0 1,4,7,9 3,8
"""

from __future__ import annotations

import argparse

import torch

from apa.measures.novelty import users_liked
from apa.measures.yields import distinct_mask, duplicate_threshold
from apa.feedback.oracle import make_oracle
from apa.feedback.tastes import prior_pool
from apa.priors.ddpm import load_prior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="mnist")
    ap.add_argument("--prefer", nargs="+", default=["1", "0", "1,4,7,9", "3,8"])
    args = ap.parse_args()
    prior = load_prior(args.prior)
    pool = prior_pool(prior, 2048)
    print("| liked set | liked of 2,048 | threshold | distinct of the second half | 50 images twice |\n"
          "|---|---|---|---|---|")
    for prefer in args.prefer:
        user = make_oracle({"prefer": prefer}, prior)
        liked = pool[users_liked(user, pool)]
        half = liked.shape[0] // 2
        threshold = duplicate_threshold(liked[:half])
        counted = liked[half:][:256]
        twice = int(distinct_mask(torch.cat([counted[:50], counted[:50]]), threshold).sum())
        distinct = int(distinct_mask(counted, threshold).sum())
        print(f"| {{{prefer}}} | {liked.shape[0]} | {threshold:.3f} | {distinct} of {counted.shape[0]} | {twice} |",
              flush=True)


if __name__ == "__main__":
    main()
