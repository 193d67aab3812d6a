"""Which tilt of the prior by a session's final surrogate holds the most liked, distinct images: finished
sessions, their final surrogate read on the benchmark's plain prior samples, each tilt's exact target
measured on that pool (no sampling, so no Monte Carlo error beyond the pool's).

For a tilt f(P) of the surrogate's P(liked | x), the target is the pool reweighted by w ∝ exp(β·f). Per
tilt and session: the target's liked share under the oracle and the judge; its rarest liked class
(judge, share of the preferred); and the expected distinct and distinct-liked images of 256 drawn by
weight from the pool (Σ 1 − (1 − w_i)^256), the yield a resampled batch can reach at best.

Tilts: ``power:B`` (P^B, the default at B = 2), ``top:Q:B`` (P^B on the pool's top share Q by P, zero below:
a cut of the unsure middle where the taste is common, as ranking plain samples makes), ``rel:C:B`` (the same
with Q = C × the pool's mean P, the surrogate's own estimate of the taste's share) and ``cap:T:B`` ((min(P, T)/T)^B, smooth: flat where the
surrogate is sure the image is liked, steep below T, so it sharpens against the unsure middle without
seeking the surrogate's single most certain mode).

  python benchmarks/tilt_probe.py runs/yield2_mnist/mnist_p0_n0_s0 ... --reference runs/yield2_mnist/reference_mnist_25_4096.pt \\
      --tilts power:2,power:4,cap:0.7:4,cap:0.7:8
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from align_results import PoolLabels, copied_session, pool_labels  # noqa: E402

DRAWN = 256


def tilt(spec: str, log_p: torch.Tensor) -> torch.Tensor:
    """Log-weights [n] of the tilt ``spec`` for log P(liked | x) [n] (float64)."""
    kind, *args = spec.split(":")
    if kind == "power":
        return float(args[0]) * log_p
    if kind in ("top", "rel"):  # P^B on the top share Q of the pool by P (rel: Q = C × the pool's mean P), nothing below
        q, b = float(args[0]) * (float(log_p.exp().mean()) if kind == "rel" else 1.0), float(args[1])
        cut = torch.quantile(log_p, 1.0 - q)
        return torch.where(log_p >= cut, b * log_p, torch.full_like(log_p, -1e9))
    if kind == "cap":
        t, b = math.log(float(args[0])), float(args[1])
        return b * (t - F.softplus(t - log_p, beta=8.0))  # a smooth min(log P, log T), shifted by log T
    raise SystemExit(f"unknown tilt {spec!r}; use power:B, top:Q:B, rel:C:B or cap:T:B")


def measures(logw: torch.Tensor, liked: dict[str, torch.Tensor], classes: torch.Tensor | None,
             prefer: tuple) -> dict[str, float]:
    """What the target reweighted by log-weights logw [n] holds: liked shares, distinct and yield of 256."""
    w = torch.softmax(logw, 0)
    seen = 1.0 - (1.0 - w).pow(DRAWN)  # P(pool image i is among 256 draws by weight)
    row = {"distinct": float(seen.sum())}
    for by, mask in liked.items():
        row[f"{by}_share"] = float(w[mask].sum())
        row[f"{by}_yield"] = float(seen[mask].sum())
    if classes is not None and len(prefer) > 1:
        mass = torch.stack([w[liked["judge"] & (classes == c)].sum() for c in prefer])
        row["rarest"] = float(mass.min() / mass.sum().clamp_min(1e-12))
    return row


def reward_on_pool(reward, reference: torch.Tensor) -> torch.Tensor:
    """A session's reward (log P(liked | x)) read on the reference particles [n, *event]: [n] float64."""
    with torch.no_grad():
        return torch.cat([reward(z) for z in reference.split(512)]).double()


def surrogate_on_pool(src: str, reference: torch.Tensor) -> tuple[torch.Tensor, PoolLabels]:
    """The finished session's final surrogate read on the reference particles [n, *event]: (log P(liked | x)
    [n] float64, the pool judged for its user)."""
    with copied_session(src) as s:
        log_p = reward_on_pool(s.fitter.reward(s.surrogate_after(len(s.store.rounds()) - 1)), reference)
        return log_p, pool_labels(s, reference)


def session_rows(src: str, reference: torch.Tensor, tilts: list[str]) -> dict[str, dict]:
    log_p, pool = surrogate_on_pool(src, reference)
    return {t: measures(tilt(t, log_p), pool.liked, pool.classes, pool.prefer) for t in tilts}


KEYS = ("judge_share", "oracle_share", "rarest", "distinct", "judge_yield", "oracle_yield")


def _share(key: str) -> bool:
    return key.endswith("share") or key == "rarest"


def print_header(what: str) -> None:
    print(f"| session | {what} | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 2), flush=True)


def print_row(session: str, variant: str, row: dict) -> None:
    cells = [f"{row[k]:.3f}" if _share(k) else f"{row[k]:.0f}" for k in KEYS if k in row]
    print(f"| {session} | {variant} | " + " | ".join(cells) + " |", flush=True)


def print_means(what: str, every: dict[str, list[dict]]) -> None:
    """Per variant, the mean of each measure over the sessions (shares with their worst session)."""
    print(f"\nmean over sessions:\n| {what} | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 1))
    for variant, rows in every.items():
        cells = []
        for k in KEYS:
            vals = [r[k] for r in rows if k in r]
            cells.append("" if not vals else f"{statistics.mean(vals):.3f} (worst {min(vals):.3f})" if _share(k)
                         else f"{statistics.mean(vals):.0f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    ap.add_argument("--reference", required=True, help="the benchmark's plain prior particles (.pt)")
    ap.add_argument("--tilts", default="power:1,power:2,power:4,cap:0.5:4,cap:0.7:4,cap:0.7:8,cap:0.9:8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tilts = args.tilts.split(",")
    reference = torch.load(args.reference)
    print_header("tilt")
    every: dict[str, list[dict]] = {t: [] for t in tilts}
    for src in args.sessions:
        for t, row in session_rows(src, reference, tilts).items():
            every[t].append(row)
            print_row(Path(src).name, t, row)
    print_means("tilt", every)


if __name__ == "__main__":
    main()
