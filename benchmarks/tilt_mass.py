"""How much of the prior each round's tilt keeps, as a session could know it: per finished session and round,
the surrogate fitted after that round read on the benchmark's plain prior samples.

Per round r: Z = E_prior[P^β] (the normaliser of the next round's target, which the round's own SMC run
estimates as its log-normaliser), E_prior[P] (the surrogate's estimate of the taste's share of the prior),
and the judge's share of liked images among the reference samples (the truth). A rule that runs a round
more cheaply where the taste is common can only read Z or E[P]; this says whether they separate common
tastes from rare ones.

  python benchmarks/tilt_mass.py runs/base/mnist_* --reference runs/base/reference_mnist_25_4096.pt
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_results import copied_session, pool_labels  # noqa: E402
from tilt_probe import reward_on_pool  # noqa: E402


def session_rows(src: str, reference: torch.Tensor, beta: float) -> list[dict]:
    """One row per tilted round of the finished session ``src``."""
    with copied_session(src) as s:
        truth = float(pool_labels(s, reference).liked["judge"].double().mean())
        rounds = s.store.rounds()
        rows = []
        for r in range(len(rounds) - 1):
            surrogate = s.surrogate_after(r)
            if surrogate is None:
                continue
            log_p = reward_on_pool(s.fitter.reward(surrogate), reference)
            rows.append({"log_z": float(torch.logsumexp(beta * log_p, 0) - math.log(len(log_p))),
                         "share_est": float(log_p.exp().mean()), "truth": truth})
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    ap.add_argument("--reference", required=True, help="the benchmark's plain prior particles (.pt)")
    ap.add_argument("--beta", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reference = torch.load(args.reference)
    print("| session | judge's share of the prior | Z = E[P^β] after rounds 1, 2, ... | E[P] after rounds 1, 2, ... |\n"
          "|---|---|---|---|", flush=True)
    for src in args.sessions:
        rows = session_rows(src, reference, args.beta)
        if not rows:
            continue
        zs = " ".join(f"{math.exp(r['log_z']):.3f}" for r in rows)
        ps = " ".join(f"{r['share_est']:.3f}" for r in rows)
        print(f"| {Path(src).name} | {rows[0]['truth']:.3f} | {zs} | {ps} |", flush=True)


if __name__ == "__main__":
    main()
