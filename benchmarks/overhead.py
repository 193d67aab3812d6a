"""Wall time of FKC-SMC against plain ancestral sampling (the same call with β = 0), side by side.

Both samplers run interleaved (A, B, A, B, ...) in one process on the same particles and steps;
the table gives the median seconds of each and their ratio. Priors: the Gaussian mixture and,
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


def compare(prior, reward, n: int, steps: int, repeats: int, **kw) -> tuple[float, float]:
    """Median seconds of (FKC-SMC, plain) over interleaved repeats."""
    def go(beta):
        return lambda: fkc_sample(prior, reward, num_particles=n, num_steps=steps, beta=beta,
                                  generator=torch.Generator().manual_seed(0), **kw)
    fkc_t, plain_t = [], []
    go((0.5, 2.0))()  # warm-up
    for _ in range(repeats):
        fkc_t.append(timed(go((0.5, 2.0))))
        plain_t.append(timed(go((0.0, 0.0))))
    return statistics.median(fkc_t), statistics.median(plain_t)


def cases():
    gmm = make_gmm({})
    a = torch.tensor([0.8, 0.5])
    yield "gmm 2-D, r at z_t", gmm, (lambda z: z @ a), 1024, 100, {}
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
    print("| prior / reward | N | steps | FKC-SMC s | plain s | ratio |\n|---|---|---|---|---|---|")
    for name, prior, reward, n, steps, kw in cases():
        f, p = compare(prior, reward, n, steps, args.repeats, **kw)
        print(f"| {name} | {n} | {steps} | {f:.3f} | {p:.3f} | {f / p:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
