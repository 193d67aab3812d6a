"""FKC-SMC against the closed form on a 2-D, three-component Gaussian mixture with a linear reward.

For each (N, steps) it prints the root-mean-square error over seeds of the weighted estimate of
(component probabilities, mean, covariance) against the tilted mixture p_0·exp(β_end·⟨a, z⟩),
beside the same error for N exact i.i.d. draws from the target (the Monte Carlo floor) and for
gradient guidance without weights. Run: ``python benchmarks/exactness.py [--seeds 5]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from apa import GaussianMixturePrior, fkc_sample
from apa.priors.gmm import make_gmm

A = torch.tensor([0.8, 0.5])
BETA = (0.5, 2.0)


def statistics(target: GaussianMixturePrior, x: torch.Tensor, log_w: torch.Tensor) -> dict[str, torch.Tensor]:
    w, xd = torch.exp(log_w.double()), x.double()
    m = (w[:, None] * xd).sum(0)
    c = (w[:, None, None] * (xd - m)[:, :, None] * (xd - m)[:, None, :]).sum(0)
    return {"comp": (w[:, None] * target.responsibilities(x, 0.0).double()).sum(0), "mean": m, "cov": c}


def truth(target: GaussianMixturePrior) -> dict[str, torch.Tensor]:
    m, c = GaussianMixturePrior.moments(target.means, target.stds, target.weights)
    return {"comp": target.weights.double(), "mean": m.double(), "cov": c.double()}


def errors(est: dict, ref: dict) -> dict[str, float]:
    """Max-abs error of component probabilities, L2 error of the mean, Frobenius error of the covariance."""
    return {"comp": float((est["comp"] - ref["comp"]).abs().max()), "mean": float((est["mean"] - ref["mean"]).norm()),
            "cov": float((est["cov"] - ref["cov"]).norm())}


def rms(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: (sum(r[k] ** 2 for r in rows) / len(rows)) ** 0.5 for k in rows[0]}


def run(ns: list[int], steps_list: list[int], seeds: int) -> list[dict]:
    prior = make_gmm({})
    target = prior.tilted(A, BETA[1])
    ref = truth(target)
    table = []
    for n in ns:
        floor = rms([errors(statistics(target, target.sample(n, torch.Generator().manual_seed(s)),
                                       torch.full((n,), -torch.log(torch.tensor(float(n))).item())), ref)
                     for s in range(seeds)])
        for steps in steps_list:
            row = {"N": n, "steps": steps, "floor": floor}
            for name, weighted in (("fkc", True), ("guidance", False)):
                errs, t0 = [], time.perf_counter()
                for s in range(seeds):
                    res = fkc_sample(prior, lambda z: z @ A, num_particles=n, num_steps=steps, beta=BETA,
                                     use_weights=weighted, generator=torch.Generator().manual_seed(100 + s))
                    errs.append(errors(statistics(target, res.particles, res.log_weights), ref))
                row[name] = rms(errs)
                row[f"{name}_s"] = (time.perf_counter() - t0) / seeds
            table.append(row)
            print_row(row, flush=True)
    return table


HEADER = ("|    N | steps | floor comp / mean / cov | FKC-SMC comp / mean / cov | ratio to floor (comp, mean) "
          "| guidance comp / mean / cov |\n|---|---|---|---|---|---|")


def print_row(r: dict, flush: bool = False) -> None:
    f, k, g = r["floor"], r["fkc"], r["guidance"]
    print(f"| {r['N']:4d} | {r['steps']:5d} | {f['comp']:.4f} / {f['mean']:.4f} / {f['cov']:.4f} "
          f"| {k['comp']:.4f} / {k['mean']:.4f} / {k['cov']:.4f} | {k['comp'] / f['comp']:.2f}x, {k['mean'] / f['mean']:.2f}x "
          f"| {g['comp']:.4f} / {g['mean']:.4f} / {g['cov']:.4f} |", flush=flush)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="256,1024,4096")
    ap.add_argument("--steps", default="25,100,400")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"RMS error over {args.seeds} seeds; mixture of 3 in 2-D, r(z) = <a, z>, beta {BETA[0]} -> {BETA[1]}, "
          "systematic resampling at ESS < N/2, r at z_t\n")
    print(HEADER)
    run([int(x) for x in args.ns.split(",")], [int(x) for x in args.steps.split(",")], args.seeds)


if __name__ == "__main__":
    main()
