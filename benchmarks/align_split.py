"""Where the time of one default `apa align` run goes: sampling, surrogate fit, feedback, I/O.

Runs one whole session with the command's defaults (or reads finished runs' results.json from
benchmarks/align_results.py) and prints each part's seconds and share of the wall time.

  python benchmarks/align_split.py                      # one fresh default run
  python benchmarks/align_split.py runs/final/default/results.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from apa.session.lifecycle import FINAL, drive
from apa.config import AlignConfig
from apa.session import Session

PARTS = ("sampling", "surrogate_fit", "feedback", "io", "evaluation", "final_sampling")


def fresh_run() -> list[dict]:
    out = Path(tempfile.mkdtemp()) / "s"
    t0 = time.perf_counter()
    session = Session.start(out, AlignConfig(), progress=False)
    drive(session, until=FINAL)
    session.store.save_final(session.final_samples())
    wall = time.perf_counter() - t0
    shutil.rmtree(out.parent, ignore_errors=True)
    return [{"wall_s": wall, "timings": dict(session.timings)}]


def main() -> None:
    torch.set_num_threads(2)
    runs = json.loads(Path(sys.argv[1]).read_text())["runs"] if len(sys.argv) > 1 else fresh_run()
    source = sys.argv[1] if len(sys.argv) > 1 else f"one fresh run, {torch.get_num_threads()} threads"
    print(f"{len(runs)} run(s) ({source})\n\n| part | seconds (mean) | share of wall |\n|---|---|---|")
    wall = sum(r["wall_s"] for r in runs) / len(runs)
    for part in PARTS:
        s = sum(r["timings"].get(part, 0.0) for r in runs) / len(runs)
        print(f"| {part} | {s:.2f} | {s / wall:.0%} |")
    rest = wall - sum(sum(r["timings"].get(p, 0.0) for r in runs) / len(runs) for p in PARTS)
    print(f"| other (start-up, selection) | {rest:.2f} | {rest / wall:.0%} |\n| **wall** | {wall:.2f} | 100% |")


if __name__ == "__main__":
    main()
