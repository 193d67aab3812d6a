"""A taste that changes mid-session: how fast `apa align` follows it, against no handling and simple levers.

The simulated user prefers OLD for the first ``--drift-at`` ratings and NEW after (``abrupt``), or
mixes the two over ``--span`` ratings from there (``gradual``). Every row is one whole session per
seed with the project's defaults except what the row changes:

- ``none``: every rating counts forever, equally: the default (every automatic lever below costs
  more than 0.01 of final share when the taste holds still; see ``--steady``);
- ``discount``: ``--discount 0.7`` alone; ``window``: ``--window 40`` alone; ``detect``:
  ``--detect-change 0.375`` alone (each lever on its own, against ``none``);
- ``told``: the user says when the taste changed, as a person does with the page's "My taste
  changed" button or ``--resume DIR --forget-before ROUND``: the session stops at the switch and
  is resumed with the round of the first new-taste rating (abrupt scenario only).

Beside them, a ``reference`` session whose user always preferred NEW (same seed and budget).
Per round, the round's weighted population (resampled, as the report shows it) is judged by an
oracle preferring NEW: its preferred ∧ confident share. "Recovery" is the number of NEW-taste
ratings given before the first round whose share reaches 0.9 × the reference's share at the
same round (goal: ≤ 16, two rounds of 8). The final batch is judged by the NEW oracle and by the
independent judge (``apa.evaluation.judge``); "final / reference" is its oracle share over the
reference session's (goal: ≥ 0.95).

  python benchmarks/drift.py --pairs "1,4,7,9>2,3,5" "0>3,8" --seeds 0,1,2 --jobs 2 --out runs/drift
  python benchmarks/drift.py --prior fashion --pairs "7,9>5" --out runs/drift_fashion
  python benchmarks/drift.py --rows none,discount,window,detect --scenarios abrupt --seeds 0   # the levers
  python benchmarks/drift.py --summarise runs/drift
  python benchmarks/drift.py --steady 1,4,7,9 0 3,8 2,5 --rows detect,window --out runs/drift_steady   # no drift

``--steady SETS`` checks the other side: users who never change taste, each lever of ``--rows``
against no handling (the default). A session in which ``detect`` finds no change is the same
session bit for bit as with no handling (tests/session/test_session.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path

import torch

from apa.session.lifecycle import FINAL, drive
from apa.config import preset
from apa.session import Session, with_overrides

NONE = {"surrogate": {"discount": 1.0, "window": None}, "session": {"detect_change": None}}
ROWS = {"none": NONE, "told": NONE,
        "discount": {**NONE, "surrogate": {"discount": 0.7, "window": None}},
        "window": {**NONE, "surrogate": {"discount": 1.0, "window": 40}},
        "detect": {**NONE, "session": {"detect_change": 0.375}}}
RECOVERY_FACTOR, FINAL_FACTOR = 0.9, 0.95  # the goals


def parse_pair(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """"1,4,7,9>2,3,5" -> ((1, 4, 7, 9), (2, 3, 5))."""
    old, new = text.split(">")
    return tuple(int(c) for c in old.split(",")), tuple(int(c) for c in new.split(","))


def job_config(prior: str, old, new, scenario: str, seed: int, row: str, budget: int, at: int, span: int):
    """The session's configuration: the defaults, the row's changes, and the user (drifting or not)."""
    feedback = {"prefer": new} if row == "reference" or scenario == "steady" else {
        "prefer": old, "drift_to": new, "drift_at": at, "drift_span": span if scenario == "gradual" else 0}
    changes = ROWS.get(row, NONE)
    return with_overrides(preset("default"), prior={"name": prior}, feedback=feedback,
                          session={**changes.get("session", {}), "budget": budget, "seed": seed},
                          surrogate=changes.get("surrogate", {}))


def round_shares(session: Session, judge_user) -> list[float]:
    """Per round: the preferred ∧ confident share of the round's resampled population under ``judge_user``."""
    from apa.seeding import generator
    from apa.smc.sampler import SMCResult

    out = []
    for row in session.store.rounds():
        t = session.store.round_tensors(row["round"])
        res = SMCResult(t["particles"], t["log_weights"])
        with torch.no_grad():
            images = session.prior.decode(res.resample(generator=generator(session.cfg.session.seed, row["round"],
                                                                            "final")))
        out.append(judge_user.evaluate(images)["preferred_confident_share"])
    return out


class _Stopped(Exception):
    """The session was stopped at the switch, as a person closing the page would."""


def _stop_at(session: Session, at: int) -> None:
    if session.store.spent() >= at:
        raise _Stopped


def one_job(out: Path, prior: str, old, new, scenario: str, seed: int, row: str, budget: int, at: int,
            span: int) -> dict:
    from apa.evaluation.judge import load_judge
    from apa.feedback.oracle import OracleUser

    cfg = job_config(prior, old, new, scenario, seed, row, budget, at, span)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if row == "told":  # stop at the switch, then resume saying the taste changed with the next round
        first = Session.start(out, cfg, progress=False)
        try:
            drive(first, until=FINAL, on_round=lambda r, s: _stop_at(s, at))
        except _Stopped:
            pass
        first.store.close()
        session = Session.resume(out, progress=False, forget_before=at // cfg.session.per_round + 1)
    else:
        session = Session.start(out, cfg, progress=False)
    drive(session, until=FINAL)
    images = session.final_samples()
    wall = time.perf_counter() - t0
    new_user = OracleUser(session.feedback.classifier, new)
    old_user = OracleUser(session.feedback.classifier, old)
    judge = load_judge(prior)
    result = {"prior": prior, "old": list(old), "new": list(new), "scenario": scenario, "seed": seed, "row": row,
              "round_new_share": round_shares(session, new_user), "round_old_share": round_shares(session, old_user),
              "per_round": cfg.session.per_round, "changes": session.state.changes(),
              "final_new": new_user.evaluate(images)["preferred_confident_share"],
              "final_old": old_user.evaluate(images)["preferred_confident_share"],
              "final_new_judge": judge.evaluate(images, new)["preferred_confident_share"], "wall_s": wall}
    session.store.close()
    return result


def _job(job: tuple) -> dict:
    *args, threads = job
    torch.set_num_threads(threads)
    return one_job(*args)


def recovery(shares: list[float], reference: list[float], per_round: int, at: int) -> float:
    """NEW-taste ratings given before the first round at or past the switch whose share reaches
    RECOVERY_FACTOR × the reference's at that round (inf: never)."""
    for r, (s, ref) in enumerate(zip(shares, reference)):
        if r * per_round >= at and s >= RECOVERY_FACTOR * ref:
            return float(r * per_round - at)
    return float("inf")


def braces(classes) -> str:
    """(1, 4, 7, 9) -> "{1,4,7,9}"."""
    return "{" + ",".join(map(str, classes)) + "}"


def summarise(values: list[float], counts: bool = False) -> str:
    """Mean ± sd over seeds; ``counts`` (ratings to recover): the mean and the worst, or how many never did."""
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if any(v == float("inf") for v in values):
        return f"never in {sum(v == float('inf') for v in values)} of {len(values)}"
    if counts:
        return f"{statistics.mean(values):.0f} (worst {max(values):.0f})"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def print_table(results: list[dict], at: int) -> None:
    refs = {(r["prior"], tuple(r["new"]), r["seed"]): r for r in results if r["row"] == "reference"}
    print("| prior | old -> new | scenario | handling | recovery, new-taste ratings (goal ≤ 16) | round share at +16 "
          "/ reference | final P∧C new (oracle) | final / reference (goal ≥ 0.95) | final P∧C new (judge) | "
          "final P∧C old | wall s |\n|" + "---|" * 11)
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["row"] != "reference":
            groups.setdefault((r["prior"], tuple(r["old"]), tuple(r["new"]), r["scenario"], r["row"]), []).append(r)
    for (prior, old, new, scenario, row), runs in sorted(groups.items(), key=lambda kv: (kv[0][:4], list(ROWS).index(kv[0][4]))):
        pairs = [(r, refs.get((prior, new, r["seed"]))) for r in runs]
        pairs = [(r, ref) for r, ref in pairs if ref is not None]
        rec = [recovery(r["round_new_share"], ref["round_new_share"], r["per_round"], at) for r, ref in pairs]
        k = (at + 16) // runs[0]["per_round"]
        at16 = [r["round_new_share"][k] / max(ref["round_new_share"][k], 1e-9) for r, ref in pairs
                if k < len(r["round_new_share"]) and k < len(ref["round_new_share"])]
        ratio = [r["final_new"] / max(ref["final_new"], 1e-9) for r, ref in pairs]
        cells = [summarise(rec, counts=True), summarise(at16), summarise([r["final_new"] for r in runs]), summarise(ratio),
                 summarise([r["final_new_judge"] for r in runs]), summarise([r["final_old"] for r in runs]),
                 f"{statistics.mean(r['wall_s'] for r in runs):.0f}"]
        label = "none (the default)" if row == "none" else row
        print(f"| {prior} | {braces(old)} -> {braces(new)} | {scenario} | {label} | "
              + " | ".join(cells) + " |", flush=True)
    for (prior, new, seed), ref in sorted(refs.items()):
        print(f"reference {prior} {set(new)} seed {seed}: final P∧C {ref['final_new']:.3f} (judge "
              f"{ref['final_new_judge']:.3f})")


def steady_table(results: list[dict]) -> None:
    """No drift: each lever's final P∧C against no handling (the default), per preference set."""
    by = {(tuple(r["new"]), r["seed"], r["row"]): r for r in results if r["scenario"] == "steady"}
    print("| preferred | handling | seeds | final P∧C | final P∧C, no handling | loss, worst seed (goal ≤ 0.01) | "
          "sessions with a change detected |\n|" + "---|" * 7)
    for prefer in sorted({k[0] for k in by}, key=lambda p: (len(p), p)):
        for row in [r for r in ROWS if r not in ("none", "told")]:
            seeds = sorted(k[1] for k in by if k[0] == prefer and k[2] == row and (prefer, k[1], "none") in by)
            if not seeds:
                continue
            runs, base = [by[(prefer, s, row)] for s in seeds], [by[(prefer, s, "none")] for s in seeds]
            loss = max(b["final_new"] - r["final_new"] for r, b in zip(runs, base))
            print(f"| {braces(prefer)} | {row} | {len(seeds)} | {summarise([r['final_new'] for r in runs])} "
                  f"| {summarise([b['final_new'] for b in base])} | {loss:+.3f} | "
                  f"{sum(bool(r['changes']) for r in runs)} of {len(runs)} |", flush=True)


def run_jobs(jobs: list, done: Path, workers: int) -> None:
    """Run the sessions not yet in ``done`` (a stopped run resumes where it was), each result a json file."""
    jobs = [j for j in jobs if not (done / f"{j[0].name}.json").exists()]
    print(f"{len(jobs)} sessions to run", flush=True)
    with multiprocessing.get_context("spawn").Pool(max(workers, 1)) as pool:
        for (path, *_), result in zip(jobs, pool.imap(_job, jobs, chunksize=1)):
            (done / f"{path.name}.json").write_text(json.dumps(result))
            print(f"{path.name}: final new {result['final_new']:.3f}, changes {result['changes']}", flush=True)


def steady(args, root: Path, done: Path) -> None:
    """Users who never change taste: no handling (the default) and each lever of ``--rows``."""
    tail = (args.budget, args.drift_at, args.span, 1 if args.jobs > 1 else 2)
    sets = [tuple(int(c) for c in text.split(",")) for text in args.steady]
    rows = ["none"] + [r for r in args.rows.split(",") if r not in ("none", "told")]
    run_jobs([(root / f"{args.prior}_steady_{''.join(map(str, p))}_s{s}_{row}", args.prior, p, p, "steady", s, row,
               *tail) for s in (int(s) for s in args.seeds.split(",")) for p in sets for row in rows], done, args.jobs)
    steady_table([json.loads(p.read_text()) for p in sorted(done.glob("*.json"))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="mnist", choices=("mnist", "fashion"))
    ap.add_argument("--pairs", nargs="+", default=["1,4,7,9>2,3,5", "0>3,8"], help='OLD>NEW, e.g. "0>3,8"')
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scenarios", default="abrupt,gradual")
    ap.add_argument("--rows", default="none,told,window,detect", help=f"from {','.join(ROWS)}")
    ap.add_argument("--budget", type=int, default=120)
    ap.add_argument("--drift-at", type=int, default=40)
    ap.add_argument("--span", type=int, default=32, help="ratings over which the gradual scenario mixes the tastes")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="runs/drift")
    ap.add_argument("--steady", nargs="+", metavar="SET", help="no drift: these preference sets, e.g. 1,4,7,9 0")
    ap.add_argument("--summarise", metavar="DIR")
    args = ap.parse_args()
    if args.summarise:
        runs = [json.loads(p.read_text()) for p in sorted(Path(args.summarise, "jobs").glob("*.json"))]
        print_table([r for r in runs if r["scenario"] != "steady"], args.drift_at)
        steady_table(runs)
        return
    root, done = Path(args.out), Path(args.out) / "jobs"
    done.mkdir(parents=True, exist_ok=True)
    if args.steady:
        steady(args, root, done)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = []
    for seed in seeds:
        for pair in args.pairs:
            old, new = parse_pair(pair)
            tag = f"{args.prior}_{''.join(map(str, old))}to{''.join(map(str, new))}_s{seed}"
            jobs.append((root / f"{tag}_reference", args.prior, old, new, "none", seed, "reference"))
            jobs += [(root / f"{tag}_{sc}_{row}", args.prior, old, new, sc, seed, row)
                     for sc in args.scenarios.split(",") for row in args.rows.split(",")
                     if not (row == "told" and sc != "abrupt")]
    run_jobs([(*j, args.budget, args.drift_at, args.span, 1 if args.jobs > 1 else 2) for j in jobs], done, args.jobs)
    runs = [json.loads(p.read_text()) for p in sorted(done.glob("*.json"))]
    print_table(runs, args.drift_at)


if __name__ == "__main__":
    main()
