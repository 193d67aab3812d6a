"""FKC-SMC against exact references on a 2-D, three-component Gaussian mixture with a linear reward.

The reference at S steps is what exact SMC weights target at any step count: the prior's own
plain S-step sampler (β = 0) drawn with ``--ref`` particles (2^20 by default) and reweighted at the
end by exp(β_end·⟨a, x0⟩). For each (N, S) the table prints the root-mean-square error over seeds
of the weighted estimates of component probabilities (max-abs) and mean (L2), beside the same
error of N i.i.d. draws from the target (the Monte Carlo floor), for:

  exact     the exact discrete-transition weights (the default), r read at z_t
  exact-ẑ0  the same weights with r read at the Tweedie estimate, Gaussian Jacobian (apa's default twist)
  ẑ0, K=5   the same, the potential evaluated (and the particles reweighted) at every 5th step only
  rate      the SPEC's continuous-time rate integrated per step (``weights="rate"``, the seed's form)
  guidance  the FKC drift with no weights at all

(``benchmarks/overhead.py`` times exact against rate weights, interleaved in one process.) Run: ``python benchmarks/exactness.py [--seeds 6] [--ns 4096] [--steps 10,25,100]``.
"""

from __future__ import annotations

import argparse
import math

import torch

from apa.config import SamplerConfig
from apa import GaussianMixturePrior, fkc_sample
from apa.priors.gmm import make_gmm

A = torch.tensor([0.8, 0.5])
BETA = (0.5, 2.0)
METHODS = {  # name -> fkc_sample settings beyond the problem's β and reward
    "exact": dict(weights="exact", reward_at="xt"),
    "exact-ẑ0": dict(weights="exact", reward_at="tweedie", jacobian="gaussian"),
    "ẑ0, K=5": dict(weights="exact", reward_at="tweedie", jacobian="gaussian", reweight_every=5),
    "rate": dict(weights="rate", reward_at="xt"),
    "guidance": dict(weights="none", reward_at="xt"),
}


def statistics(target: GaussianMixturePrior, x: torch.Tensor, log_w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted component probabilities [K] (responsibilities under the target) and mean [2]."""
    w, xd = torch.exp(log_w.double() - torch.logsumexp(log_w.double(), 0)), x.double()
    return {"comp": (w[:, None] * target.responsibilities(x, 0.0).double()).sum(0), "mean": (w[:, None] * xd).sum(0)}


def errors(est: dict, ref: dict) -> dict[str, float]:
    """Max-abs error of component probabilities, L2 error of the mean."""
    return {"comp": float((est["comp"] - ref["comp"]).abs().max()), "mean": float((est["mean"] - ref["mean"]).norm())}


def rms(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: (sum(r[k] ** 2 for r in rows) / len(rows)) ** 0.5 for k in rows[0]}


def discrete_reference(prior: GaussianMixturePrior, steps: int, m: int, seed: int = 12345,
                       chunk: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """p_disc·exp(β_end·⟨a, x0⟩) at ``steps`` steps: m plain-sampler draws [m, 2] and their final log-weights [m]."""
    xs, lws = [], []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, m, chunk):
        res = fkc_sample(prior, lambda z: torch.zeros(z.shape[0]), SamplerConfig(particles=min(chunk, m - start), steps=steps,
                                                                   beta=(0.0, 0.0)), generator=gen)
        xs.append(res.particles)
        lws.append(BETA[1] * (res.particles.double() @ A.double()))
    return torch.cat(xs), torch.cat(lws)


def iid_floor(target: GaussianMixturePrior, pool: tuple[torch.Tensor, torch.Tensor], ref: dict, n: int,
              seeds: int) -> dict[str, float]:
    """RMS error of n i.i.d. draws from the reference (multinomial from its weighted pool): the Monte Carlo floor."""
    x, lw = pool
    p = torch.exp(lw - torch.logsumexp(lw, 0))
    uniform = torch.full((n,), -math.log(n))
    draws = [x[torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(s))]
             for s in range(seeds)]
    return rms([errors(statistics(target, d, uniform), ref) for d in draws])


def run_method(prior, target, ref, n: int, steps: int, seeds: int, settings: dict) -> dict[str, float]:
    """RMS errors over seeds of one sampler variant."""
    errs = []
    for s in range(seeds):
        res = fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=n, steps=steps, beta=BETA, **settings),
                         generator=torch.Generator().manual_seed(100 + s))
        errs.append(errors(statistics(target, res.particles, res.log_weights), ref))
    return rms(errs)


def run(ns: list[int], steps_list: list[int], seeds: int, ref_size: int) -> list[dict]:
    prior = make_gmm({})
    target = prior.tilted(A, BETA[1])
    table = []
    for steps in steps_list:
        pool = discrete_reference(prior, steps, ref_size)
        ref = statistics(target, *pool)
        for n in ns:
            row = {"N": n, "steps": steps, "floor": iid_floor(target, pool, ref, n, max(seeds, 20))}
            for name, settings in METHODS.items():
                row[name] = run_method(prior, target, ref, n, steps, seeds, settings)
            table.append(row)
            print_row(row)
    return table


HEADER = ("| steps |    N | floor comp / mean | exact comp / mean (x floor) | exact-ẑ0 (x floor) "
          "| ẑ0, every 5th step (x floor) | rate (x floor) | guidance (x floor) |\n|---|---|---|---|---|---|---|---|")


def _cell(r: dict, name: str) -> str:
    f, e = r["floor"], r[name]
    return f"{e['comp']:.4f} / {e['mean']:.4f} ({e['comp'] / f['comp']:.1f}x, {e['mean'] / f['mean']:.1f}x)"


def print_row(r: dict) -> None:
    f = r["floor"]
    print(f"| {r['steps']:5d} | {r['N']:4d} | {f['comp']:.4f} / {f['mean']:.4f} | {_cell(r, 'exact')} "
          f"| {_cell(r, 'exact-ẑ0')} | {_cell(r, 'ẑ0, K=5')} | {_cell(r, 'rate')} | {_cell(r, 'guidance')} |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="4096")
    ap.add_argument("--steps", default="10,25,100")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--ref", type=int, default=1 << 20, help="particles of the reweighted plain-sampler reference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"RMS error over {args.seeds} seeds against the reweighted {args.ref}-particle plain sampler at the same "
          f"step count; mixture of 3 in 2-D, r(z) = <a, z>, beta {BETA[0]} -> {BETA[1]}, systematic resampling "
          "at ESS < N/2\n")
    print(HEADER)
    run([int(x) for x in args.ns.split(",")], [int(x) for x in args.steps.split(",")], args.seeds, args.ref)


if __name__ == "__main__":
    main()
