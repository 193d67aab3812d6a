"""Which surrogate: label efficiency on real digits against the sampler's overhead, side by side.

Label efficiency: for each budget, random draws of labelled training digits (+1 if the digit is
preferred, −1 otherwise), the surrogate fitted exactly as a session fits it (fresh init, Adam
1e-3, 200 epochs, batch 32, MSE), then accuracy of sign(r) and AUC on the 1,000 held-out digits.
Overhead: one round of FKC-SMC (32 particles, 25 steps, r at ẑ0 with the Gaussian Jacobian) with
each surrogate as the reward, against plain ancestral sampling, interleaved in one process.

  python benchmarks/surrogate_efficiency.py --draws 5 --budgets 16,40,80
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apa.config import SamplerConfig
from apa import data, fkc_sample
from apa.priors.ddpm import load_prior
from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate, LatentSurrogate

PREFER = (1, 4, 7, 9)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels > 0], scores[labels <= 0]
    greater = (pos[:, None] > neg[None]).float().mean()
    ties = (pos[:, None] == neg[None]).float().mean()
    return float(greater + 0.5 * ties)


def make(kind: str, prior, ensemble: int = 1) -> Ensemble:
    if kind == "pixels":
        return Ensemble([LatentSurrogate(1) for _ in range(ensemble)])
    fn = lambda x: prior.features(x, 200)  # noqa: E731
    return Ensemble([FeatureSurrogate(fn, int(fn(torch.zeros(1, 1, 28, 28)).shape[1])) for _ in range(ensemble)])


def label_efficiency(prior, kind: str, budgets: list[int], draws: int, ensemble: int = 1) -> dict[int, tuple]:
    arrays = data.load("mnist")
    xtr = torch.from_numpy(data.to_unit(arrays["train_images"])) * 2 - 1
    ytr = torch.tensor([1.0 if int(c) in PREFER else -1.0 for c in arrays["train_labels"]])
    xte = torch.from_numpy(data.to_unit(arrays["test_images"])) * 2 - 1
    yte = torch.tensor([1.0 if int(c) in PREFER else -1.0 for c in arrays["test_labels"]])
    out = {}
    for b in budgets:
        accs, aucs = [], []
        for d in range(draws):
            g = torch.Generator().manual_seed(1000 * b + d)
            idx = torch.randperm(len(ytr), generator=g)[:b]
            torch.manual_seed(d)
            model = make(kind, prior, ensemble)
            fit(model, xtr[idx], ytr[idx], FitConfig(), g)
            with torch.no_grad():
                s = model(xte)
            accs.append(float(((s > 0).float() * 2 - 1 == yte).float().mean()))
            aucs.append(auc(s, yte))
        out[b] = (statistics.mean(accs), statistics.stdev(accs) if draws > 1 else 0.0, statistics.mean(aucs))
    return out


def overhead(prior, models: dict[str, Ensemble], repeats: int) -> dict[str, float]:
    def run(reward, beta):
        t0 = time.perf_counter()
        fkc_sample(prior, reward, SamplerConfig(particles=32, steps=25, beta=beta, reward_at="tweedie", jacobian="gaussian"),
                   generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in models}}
    for _ in range(repeats):
        times["plain"].append(run(lambda z: torch.zeros(z.shape[0]), (0.0, 0.0)))
        for k, m in models.items():
            times[k].append(run(m, (0.5, 2.0)))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="16,40,80")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prior = load_prior("mnist")
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"preference {PREFER}; accuracy ± std over {args.draws} label draws / AUC; 'always not preferred' "
          "scores 0.60\n")
    print("| surrogate | " + " | ".join(f"{b} labels" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for kind, ens in (("pixels", 1), ("features", 1), ("features", 5)):
        res = label_efficiency(prior, kind, budgets, args.draws, ens)
        name = f"{kind} (seed LatentSurrogate)" if kind == "pixels" else f"{kind}, {ens}-member ensemble"
        print(f"| {name} | " + " | ".join(f"{a:.2f}±{s:.2f} / {u:.2f}" for a, s, u in res.values()) + " |", flush=True)
    t = overhead(prior, {"pixels": make("pixels", prior), "features": make("features", prior)}, args.repeats)
    print("\n| one round, 32 particles x 25 steps | seconds | ratio to plain |\n|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v:.2f} | {v / t['plain']:.2f}x |")


if __name__ == "__main__":
    main()
