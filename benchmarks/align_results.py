"""Feedback efficiency of `apa align` on the built-in MNIST default: the report's numbers.

For each preference set and seed it runs a whole session (the command's defaults unless
overridden) and evaluates the final batch with the oracle: preferred∧confident share, preferred
share, confident share (quality), the smallest preferred class's share among preferred samples
(collapse check), wall time and its split. Prints mean ± std over seeds per configuration.

  python benchmarks/align_results.py --prefer 1,4,7,9 0 3,8 2,5 --seeds 0,1,2 --out runs/results
  python benchmarks/align_results.py --prefer 1,4,7,9 --preset seed --out runs/results-seed
  python benchmarks/align_results.py --prefer 1,4,7,9 --set sampler.beta=2,8 --out runs/beta28

``--jobs N`` runs N sessions at once in separate processes, one thread each (for a machine with
many cores): every session is seeded, so the numbers are those of the sequential run, but the
wall times then include the contention and are only comparable within one such run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from apa.config import preset
from apa.evaluation.report import write_report
from apa.session import Session, with_overrides


def parse_set(items: list[str]) -> dict[str, dict]:
    """["sampler.beta=2,8", "surrogate.kind=pixels"] -> {"sampler": {"beta": (2.0, 8.0)}, ...}."""
    out: dict[str, dict] = {}
    for item in items:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        parts = value.split(",")
        parsed = [json.loads(p) if p not in ("none",) else None for p in parts] if all(
            p.replace(".", "", 1).lstrip("-").isdigit() or p == "none" for p in parts) else parts
        out.setdefault(section, {})[name] = tuple(parsed) if len(parsed) > 1 else parsed[0]
    return out


def one_run(out: Path, prefer: tuple[int, ...], seed: int, preset_name: str, overrides: dict) -> dict:
    cfg = with_overrides(preset(preset_name), **{**overrides, "feedback": {**overrides.get("feedback", {}),
                                                                           "prefer": prefer},
                                                 "session": {**overrides.get("session", {}), "seed": seed}})
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    session = Session.start(out, cfg, progress=False)
    session.run()
    path = session.save_final()
    wall = time.perf_counter() - t0
    write_report(session)
    with np.load(path) as z:
        ev = session.feedback.evaluate(torch.from_numpy(z["images"]))
    shares = ev["preferred_class_shares"]
    curve = [(r["info"].get("eval", {}).get("preferred_confident_share")) for r in session.store.rounds()]
    return {"prefer": list(prefer), "seed": seed, "wall_s": wall, "timings": dict(session.timings),
            "preferred_confident": ev["preferred_confident_share"], "preferred": ev["preferred_share"],
            "confident": ev["confident_share"], "min_class_share": min(shares.values()) if shares else 0.0,
            "class_shares": shares, "per_round": curve}


def _job(job: tuple) -> dict:
    out, prefer, seed, preset_name, overrides, threads = job
    torch.set_num_threads(threads)
    return one_run(out, prefer, seed, preset_name, overrides)


def summarise(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefer", nargs="+", default=["1,4,7,9"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", nargs="*", default=[], help="overrides like sampler.beta=2,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--jobs", type=int, default=1, help="sessions at once, in separate processes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    root = Path(args.out)
    results = []
    print(f"preset {args.preset}, overrides {overrides}\n")
    print("| prefer | seeds | preferred & confident | preferred | confident | smallest preferred class | wall s |")
    print("|---|---|---|---|---|---|---|")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(root / f"p{pref.replace(',', '')}_s{s}", tuple(int(c) for c in pref.split(",")), s, args.preset,
             overrides, args.threads) for pref in args.prefer for s in seeds]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(_job, jobs, chunksize=1)
    else:
        done = map(_job, jobs)
    done = iter(done)
    for pref in args.prefer:
        rows = [next(done) for _ in seeds]
        results.extend(rows)
        print(f"| {{{pref}}} | {args.seeds} | {summarise(rows, 'preferred_confident')} | {summarise(rows, 'preferred')} "
              f"| {summarise(rows, 'confident')} | {summarise(rows, 'min_class_share')} | {summarise(rows, 'wall_s')} |",
              flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps({"preset": args.preset, "overrides": args.set, "runs": results},
                                                  indent=2, default=str))


if __name__ == "__main__":
    main()
