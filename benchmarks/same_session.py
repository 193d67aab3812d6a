"""A default `apa align` session's fingerprint, to show two builds run the same session.

Per (preferred classes, seed): the SHA-256 of the final batch, the oracle's preferred-and-confident
share of it and the liked ratings. Run it with two builds side by side; equal lines mean the
change did not move the default session (and so no result measured on the older build):

  git worktree add /tmp/old a25810e
  python benchmarks/same_session.py 3,8:1 0:2 2,5:0
  PYTHONPATH=/tmp/old/src python benchmarks/same_session.py 3,8:1 0:2 2,5:0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from apa.session.lifecycle import FINAL, drive
from apa.config import preset
from apa.session import Session, with_overrides


def fingerprint(prefer: tuple[int, ...], seed: int, out: Path, prior: str = "mnist", budget: int | None = None) -> dict:
    """The default session for (prefer, seed) run to its final batch (``budget``: its ratings; None: the default's)."""
    session_overrides = {"seed": seed} if budget is None else {"seed": seed, "budget": budget}
    cfg = with_overrides(preset("default"), prior={"name": prior}, feedback={"prefer": prefer},
                         session=session_overrides)
    session = Session.start(out, cfg, progress=False)
    drive(session, until=FINAL)
    session.store.save_final(session.final_samples())
    with np.load(session.store.final_path) as z:
        images = z["images"]
    share = session.feedback.evaluate(torch.from_numpy(images))["preferred_confident_share"]
    liked = sum(x["score"] > 0 for x in session.store.ratings())
    session.store.close()
    return {"prefer": list(prefer), "seed": seed, "final_sha256": hashlib.sha256(images.tobytes()).hexdigest()[:16],
            "preferred_confident": share, "liked_ratings": liked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", nargs="+", metavar="CLASSES:SEED", help='e.g. "3,8:1"')
    ap.add_argument("--prior", default="mnist", choices=("mnist", "fashion"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for k, job in enumerate(args.jobs):
            classes, seed = job.split(":")
            prefer = tuple(int(c) for c in classes.split(","))
            print(json.dumps({"prior": args.prior, **fingerprint(prefer, int(seed), Path(root) / str(k), args.prior)}),
                  flush=True)


if __name__ == "__main__":
    main()
