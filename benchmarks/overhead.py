"""Wall time of FKC-SMC (exact weights, and the rate form) against plain ancestral sampling, side by side.

The three run interleaved (A, B, C, A, B, C, ...) in one process on the same particles and
steps: FKC-SMC with exact discrete-transition weights (the default), the same with the seed's
rate-form weights, and the same call with β = 0 (the plain sampler, the anchor). The table gives
the median seconds of each and their ratios. Priors: the Gaussian mixture and,
when its weights are present, the built-in MNIST DDPM with a surrogate-sized reward network
under each way of reading the reward (at z_t; at ẑ0 with the Gaussian or the exact Jacobian).
Run: ``python benchmarks/overhead.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from apa.config import SamplerConfig
from apa import fkc_sample
from apa.priors.gmm import make_gmm


def conv_reward(channels: int) -> nn.Module:
    """A reward of the seed surrogate's size: Conv(C->128) -> pool -> MLP 128-256-128-1."""
    return nn.Sequential(nn.Conv2d(channels, 128, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 128), nn.SiLU(), nn.Linear(128, 1))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


VARIANTS = {"exact": ((0.5, 2.0), "exact"), "rate": ((0.5, 2.0), "rate"), "plain": ((0.0, 0.0), "exact")}


def compare(prior, reward, n: int, steps: int, repeats: int, **kw) -> dict[str, float]:
    """Median seconds of each variant (exact FKC, rate FKC, plain) over interleaved repeats."""
    def go(beta, weights):
        return lambda: fkc_sample(prior, reward, SamplerConfig(particles=n, steps=steps, beta=beta, weights=weights, **kw),
                                  generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    go(*VARIANTS["exact"])()  # warm-up
    for _ in range(repeats):
        for name, (beta, weights) in VARIANTS.items():
            times[name].append(timed(go(beta, weights)))
    return {k: statistics.median(v) for k, v in times.items()}


def cases():
    gmm = make_gmm({})
    a = torch.tensor([0.8, 0.5])
    yield "gmm 2-D, r at z_t", gmm, (lambda z: z @ a), 1024, 100, {"reward_at": "xt"}
    try:
        from apa.priors.ddpm import load_prior
        ddpm = load_prior("mnist")
    except FileNotFoundError:
        return
    net = conv_reward(1).requires_grad_(False)
    r = lambda z: net(z).squeeze(1)  # noqa: E731
    yield "mnist DDPM, r at z_t", ddpm, r, 32, 25, {"reward_at": "xt"}
    yield "mnist DDPM, r at x0, Gaussian Jacobian", ddpm, r, 32, 25, {"reward_at": "tweedie", "jacobian": "gaussian"}
    yield "mnist DDPM, r at x0, exact Jacobian", ddpm, r, 32, 25, {"reward_at": "tweedie", "jacobian": "exact"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"median of {args.repeats} interleaved runs, {args.threads} threads\n")
    print("| prior / reward | N | steps | exact FKC s | rate FKC s | plain s | exact / rate | exact / plain |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, prior, reward, n, steps, kw in cases():
        t = compare(prior, reward, n, steps, args.repeats, **kw)
        print(f"| {name} | {n} | {steps} | {t['exact']:.3f} | {t['rate']:.3f} | {t['plain']:.3f} "
              f"| {t['exact'] / t['rate']:.2f}x | {t['exact'] / t['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
