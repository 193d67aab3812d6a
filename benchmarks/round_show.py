"""What a round would have shown under each acquisition rule: finished sessions' stored rounds (their
weighted populations), each rule's expected share of shown images the user likes, from round 3 on.

Offline and off-policy (the later rounds' populations came from the surrogate the session's own rule
taught), so it screens the rules; a whole session decides. Rules: ``random`` (distinct particles
uniformly: the expectation is the distinct particles' liked share), ``weighted`` (distinct particles
drawn by their summed weights without replacement; 200 draws), ``weight`` (the heaviest distinct
particles), and ``stored`` (what the session showed, the explored plain samples left out).

  python benchmarks/round_show.py runs/yield2_mnist/mnist_p0_n0_s0 runs/yield2_mnist/mnist_p38_n0_s0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from align_results import LATE_ROUND, copied_session  # noqa: E402

from apa.measures.novelty import users_liked  # noqa: E402
from apa.session.acquisition import Candidates, by_weight, distinct, weighted  # noqa: E402

DRAWS = 200


def round_shares(session, path: Path, k: int) -> dict[str, float]:
    """Each rule's expected liked share of the k shown images of one stored round."""
    d = load_file(str(path))
    x, lw, shown = d["particles"], d["log_weights"], d["shown"]
    liked = users_liked(session.feedback, session.prior.decode(x)).double()
    first, _ = distinct(x)
    c, gen = Candidates(x, lw), torch.Generator().manual_seed(0)
    return {"random": float(liked[first].mean()),
            "weighted": statistics.mean(float(liked[weighted(c, k, gen)].mean()) for _ in range(DRAWS)),
            "weight": float(liked[by_weight(c, k, None)].mean()),
            "stored": float(liked[shown[shown < x.shape[0]]].mean())}


def session_shares(src: str) -> dict[str, float]:
    with copied_session(src) as s:
        paths = sorted((s.store.root / "rounds").glob("round_*.safetensors"))[LATE_ROUND:]
        rows = [round_shares(s, p, s.cfg.session.per_round) for p in paths]
        return {rule: statistics.mean(r[rule] for r in rows) for rule in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rules = ("random", "weighted", "weight", "stored")
    print("| session | " + " | ".join(rules) + " |\n|" + "---|" * (len(rules) + 1), flush=True)
    every = []
    for src in args.sessions:
        row = session_shares(src)
        every.append(row)
        print(f"| {Path(src).name} | " + " | ".join(f"{row[r]:.3f}" for r in rules) + " |", flush=True)
    print("| mean | " + " | ".join(f"{statistics.mean(r[rule] for r in every):.3f}" for rule in rules) + " |")


if __name__ == "__main__":
    main()
