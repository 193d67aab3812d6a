"""How a prior's 25-step samples change with the sampler, judged by an oracle (ddpm_fashion.md).

Usage: python scripts/sampler_probes.py DATASET [-n 512] [--oracle-weights PATH]
Prints the confident share (max probability >= 0.9) of n samples (seed 0) for: the shipped sampler
(25 evenly spaced noise levels); 50 and 100 steps; the 25 levels spaced quadratically in t or as in
Karras et al. (rho = 3, 7) between the schedule's end points; and the denoiser's estimate of the
clean image clipped to [-1, 1] inside every step.
"""

from __future__ import annotations

import argparse

import torch

from apa.feedback.classifier import load_oracle, predict_proba
from apa.priors.ddpm import NUM_TRAIN_TIMESTEPS, load_prior
from apa.smc.sampler import sample_prior


def karras_sigmas(prior, n: int, rho: float) -> torch.Tensor:
    """n noise levels from the schedule's largest to its smallest, evenly spaced in σ^(1/ρ), then 0."""
    hi, lo = float(prior.sigma_of_t(torch.tensor(NUM_TRAIN_TIMESTEPS - 1))), float(prior.sigma_of_t(torch.tensor(0)))
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.cat([((hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho).float(), torch.zeros(1)])


def quadratic_sigmas(prior, n: int) -> torch.Tensor:
    """n training timesteps spaced quadratically from T-1 to 0 (denser near the data), as σ, then 0."""
    t = (torch.linspace((NUM_TRAIN_TIMESTEPS - 1) ** 0.5, 0, n, dtype=torch.float64) ** 2).round().long()
    return torch.cat([prior.sigma_of_t(t), torch.zeros(1)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("--oracle-weights")
    args = ap.parse_args()
    prior, oracle = load_prior(args.dataset), load_oracle(args.dataset, args.oracle_weights)
    shipped_sigmas, shipped_eps = prior.sigmas, prior.eps

    def clipped_eps(z, sigma):
        x0 = (z - sigma * shipped_eps(z, sigma)).clamp(-1, 1)
        return (z - x0) / sigma

    variants = [("shipped: 25 evenly spaced steps", 25, shipped_sigmas, shipped_eps),
                ("50 steps", 50, shipped_sigmas, shipped_eps), ("100 steps", 100, shipped_sigmas, shipped_eps),
                ("quadratic in t", 25, lambda n: quadratic_sigmas(prior, n), shipped_eps),
                ("Karras rho=3", 25, lambda n: karras_sigmas(prior, n, 3.0), shipped_eps),
                ("Karras rho=7", 25, lambda n: karras_sigmas(prior, n, 7.0), shipped_eps),
                ("clipped denoiser", 25, shipped_sigmas, clipped_eps)]
    print("| sampler | confident |\n|---|---|")
    for name, steps, sigmas, eps in variants:
        prior.sigmas, prior.eps = sigmas, eps
        images = sample_prior(prior, args.n, steps, torch.Generator().manual_seed(0))
        print(f"| {name} | {(predict_proba(oracle, images).max(1).values >= 0.9).float().mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
