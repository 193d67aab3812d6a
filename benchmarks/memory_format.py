"""Wall time of the built-in prior's network in channels-last memory against contiguous (NCHW), side by side.

The two formats run interleaved (A, B, A, B, ...) in one process, so both see the same load on the
cores. Rows, each timed per format:
- the ε-network on 32 rows (a round's particles at one step) and on 256 (the final batch's);
- the surrogate's features and their gradient on 32 and on 256 rows (the reward's share of one step);
- a short `apa align` session for the digits 1, 4, 7 and 9 (the default but for the budget: 16 ratings,
  two rounds, and the final batch of 256; `same_session.fingerprint`), which also prints what each format's session took home.
The anchor is the contiguous format (``apa.priors.ddpm.MEMORY_FORMAT = torch.contiguous_format``),
which the prior used before. The table gives the median seconds and the ratio to the anchor.
Run: ``python benchmarks/memory_format.py [--repeats 3] [--budget 16]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from apa.priors import ddpm

sys.path.insert(0, str(Path(__file__).parent))
from overhead import timed  # noqa: E402
from same_session import fingerprint  # noqa: E402

FORMATS = {"contiguous (anchor)": torch.contiguous_format, "channels-last": torch.channels_last}


def network_rows(prior: ddpm.DDPMPrior, rows: int = 256) -> dict:
    """Callables timing one ε call and one features-and-gradient call on ``rows`` particles."""
    z = torch.randn(rows, *prior.event_shape, generator=torch.Generator().manual_seed(0))

    def eps() -> None:
        with torch.no_grad():
            prior.eps(z, 1.0)

    def features_grad() -> None:
        zz = z.clone().requires_grad_(True)
        torch.autograd.grad(prior.features(zz).pow(2).sum(), zz)

    return {f"ε, {rows} rows": eps, f"features + gradient, {rows} rows": features_grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16, help="ratings of the session row (0: no session row)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for rep in range(args.repeats):
            for name, fmt in FORMATS.items():
                ddpm.MEMORY_FORMAT = fmt
                prior = ddpm.load_prior("mnist")
                for row, fn in {**network_rows(prior, 32), **network_rows(prior, 256)}.items():
                    fn()  # warm the kernels for this shape and format
                    times.setdefault((row, name), []).append(min(timed(fn) for _ in range(3)))
                if args.budget:
                    row = f"`apa align`, {args.budget} ratings"
                    t0 = time.perf_counter()
                    took = fingerprint((1, 4, 7, 9), rep, Path(root) / f"{rep}-{fmt}", budget=args.budget)
                    times.setdefault((row, name), []).append(time.perf_counter() - t0)
                    print(f"repeat {rep}, {name}: session {times[(row, name)][-1]:.1f} s, "
                          f"P∧C {took['preferred_confident']:.3f}", flush=True)
    rows = dict.fromkeys(row for row, _ in times)
    anchor = next(iter(FORMATS))
    print(f"\n| what | {' | '.join(f'{n} s' for n in FORMATS)} | channels-last / anchor |")
    print("|---|" + "---|" * (len(FORMATS) + 1))
    for row in rows:
        med = {n: statistics.median(times[(row, n)]) for n in FORMATS}
        print(f"| {row} | {' | '.join(f'{med[n]:.3f}' for n in FORMATS)} | {med['channels-last'] / med[anchor]:.2f} |")


if __name__ == "__main__":
    main()
