"""One network call for K sessions against K calls of their own: what batching can save, per call.

The built-in MNIST prior's network, K sessions of N particles each, one step's calls: ε (no
gradient) and the surrogate's features with their input gradient. Rows, side by side in one
process, each the mean of ``--repeats`` after one warm-up:

- ``own`` (the anchor): K calls of N rows, one after the other;
- ``one call``: one call of K·N rows, the network as it is;
- ``one call, per caller``: one call of K·N rows with the matrix products and GroupNorms run per
  caller, as ``priors/batching.BatchingPrior`` runs it so each session keeps its own bits.

  python benchmarks/batched_calls.py --sessions 4 --particles 32
"""

from __future__ import annotations

import argparse
import time

import torch

from apa.session.components import shared_prior
from apa.config import preset


def timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--particles", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = shared_prior(vars(preset("default").prior)).model
    k, n = args.sessions, args.particles
    x = torch.randn(k * n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.full((k * n,), 500.0)
    segments = (n,) * k

    def features_grad(rows: slice, seg=None):
        xg = x[rows].clone().requires_grad_(True)
        return torch.autograd.grad(net.features(xg, t[rows], seg).sum(), xg)

    with torch.no_grad():
        eps = {"own": timed(lambda: [net(x[i * n:(i + 1) * n], t[:n]) for i in range(k)], args.repeats),
               "one call": timed(lambda: net(x, t), args.repeats),
               "one call, per caller": timed(lambda: net(x, t, segments), args.repeats)}
    feats = {"own": timed(lambda: [features_grad(slice(i * n, (i + 1) * n)) for i in range(k)], args.repeats),
             "one call": timed(lambda: features_grad(slice(None)), args.repeats),
             "one call, per caller": timed(lambda: features_grad(slice(None), segments), args.repeats)}
    print(f"| {k} sessions x {n} particles | ε s | x own | features + gradient s | x own |\n|---|---|---|---|---|")
    for row in eps:
        print(f"| {row} | {eps[row]:.3f} | {eps['own'] / eps[row]:.2f} | {feats[row]:.3f} | "
              f"{feats['own'] / feats[row]:.2f} |")


if __name__ == "__main__":
    main()
