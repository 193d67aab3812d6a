"""What ranking plain prior samples by a session's own final surrogate would take home: finished sessions, their
final surrogate read on the benchmark's plain prior samples; for each pool size M, M of them drawn at random
(20 draws), the best 256 by P(liked | x) kept, and the judge's liked images among them counted (a bound on
the yield: the pool's samples are distinct, and near-copies of rated images are not removed). Beside it, the
session's P² target's expected distinct judge-liked images of 256 on the whole pool (``tilt_probe.py``'s).

  python benchmarks/rank_probe.py runs/yield2_mnist/mnist_p*_s0 --reference runs/yield2_mnist/reference_mnist_25_4096.pt \\
      --pools 1010,1810
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tilt_probe import measures, surrogate_on_pool  # noqa: E402

KEPT, DRAWS = 256, 20


def ranked_liked(log_p: torch.Tensor, liked: torch.Tensor, m: int) -> float:
    """The mean count of ``liked`` [n] images among the best KEPT by log_p [n] of m random pool images."""
    got = []
    for k in range(DRAWS):
        sub = torch.randperm(log_p.numel(), generator=torch.Generator().manual_seed(k))[:m]
        got.append(int(liked[sub[torch.argsort(-log_p[sub])[:KEPT]]].sum()))
    return statistics.mean(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    ap.add_argument("--reference", required=True, help="the benchmark's plain prior particles (.pt)")
    ap.add_argument("--pools", default="1010,1810", help="pool sizes M, comma-separated")
    args = ap.parse_args()
    pools = [int(m) for m in args.pools.split(",")]
    reference = torch.load(args.reference)
    print("| session | " + " | ".join(f"ranking M = {m}" for m in pools) + " | P² target's judge yield (pool) |")
    print("|---|" + "---|" * (len(pools) + 1))
    for src in args.sessions:
        log_p, pool = surrogate_on_pool(src, reference)
        cells = [f"{ranked_liked(log_p, pool.liked['judge'], m):.0f}" for m in pools]
        row = measures(2.0 * log_p, pool.liked, pool.classes, pool.prefer)
        print(f"| {Path(src).name} | " + " | ".join(cells) + f" | {row['judge_yield']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
