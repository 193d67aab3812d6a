"""What the rounds leave unshown: could the final batch reuse them? Finished sessions' stored rounds, per
round, the particles of the weighted population the round did not show, counted as the yield counts a
final image: liked by the simulated user, new (no near-copy of any image the session rated) and distinct
from one another.

A tilted round runs 32 particles and shows 8; the other 24 cost as much as the shown ones. Reused in the
final batch (reweighted to the final target, as importance tempering pools the stages of a tempered
sampler), they would add images at no sampling cost, but only those that are new: resampling in a round
leaves copies of the particles it then shows.

  python benchmarks/round_leftovers.py runs/mild/mnist_p25_n0_s0 runs/mild/mnist_p1479_n0_s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_results import copied_session  # noqa: E402

from apa.feedback.tastes import prior_pool  # noqa: E402
from apa.measures.novelty import users_liked  # noqa: E402
from apa.measures.yields import distinct_mask, duplicate_threshold, new_mask  # noqa: E402

POOL = 1024  # plain prior samples: the liked ones set both thresholds, as the benchmark's yield sets them


def leftovers(src: str) -> list[tuple[int, bool, int, int, int, int]]:
    """Per round of the session at ``src`` (a copy; never written): (round, tilted, unshown weighted
    particles, of them liked, liked and new, liked, new and distinct)."""
    out = []
    with copied_session(src) as s:
        pool = prior_pool(s.prior, POOL)
        prior_liked = pool[users_liked(s.feedback, pool)]
        rated = s.prior.decode(s.state.training_set()[0])
        dup = duplicate_threshold(prior_liked)
        for row in s.store.rounds():
            t = s.store.round_tensors(row["round"])
            keep = torch.isfinite(t["log_weights"])
            keep[t["shown"].long()] = False
            images = s.prior.decode(t["particles"][keep])
            liked = users_liked(s.feedback, images)
            good = liked & new_mask(images, rated, prior_liked)
            out.append((row["round"], bool(row["info"].get("beta_used")), images.shape[0], int(liked.sum()),
                        int(good.sum()), int(distinct_mask(images[good], dup).sum())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| session | rounds (tilted) | unshown particles | liked | liked and new | liked, new, distinct |\n"
          "|---|---|---|---|---|---|", flush=True)
    total = [0, 0, 0, 0]
    for src in args.sessions:
        rows = [r for r in leftovers(src) if r[1]]  # the tilted rounds: a search round's are plain samples
        sums = [sum(r[i] for r in rows) for i in range(2, 6)]
        total = [a + b for a, b in zip(total, sums)]
        print(f"| {Path(src).name} | {len(rows)} | " + " | ".join(map(str, sums)) + " |", flush=True)
    print("| all | | " + " | ".join(map(str, total)) + " |")


if __name__ == "__main__":
    main()
