"""What `apa align` gives a person against best-of-N and learned-reward best-of-M: the README's results.

Every row counts what a person takes home, the *yield* (final images that are liked, new and
distinct: ``apa.measures.yields``) under both evaluators, per 256 images and per 1,000 network-call
rows (``apa.priors.calls``; the method's rounds and final batch), beside the share, the distinct
images, the first rating that liked an image and the calls. ``--taste`` adds tastes no class names
(``apa.feedback.tastes``), scored by the judge from its own view. Each finished job is a JSON file
under OUT/jobs; a rerun skips them (resumable per job).

For each preference set, label-noise level and seed it runs one whole `apa align` session (the
command's defaults unless overridden), then draws its final batch once per ``--final`` variant
from the same session (one thing changed at a time: where the final batch starts), and runs
each ``--peers`` method (default best-of-N and learned-reward best-of-M; any of ``apa.baselines``,
their code and settings unchanged) on the same prior, simulated user, seed, budget, round size and
final batch size. Every batch is judged twice: by the simulated user's oracle
(with real held-out images of the preferred classes for the Fréchet distance in its features), and
by the independent judge (``apa.evaluation.judge``: another network, another data split, a "none of
the classes" output), which never rated anything. Per batch: preferred∧confident share under both,
the rarest preferred class's share among the preferred (both), near-copies of the liked rated
images and the distance ratio (``apa.measures.novelty``, preferred images by the judge, 4,096
plain prior samples as the yardstick), the share of shown images the user liked from round 3 on,
and the total variation between the batch's class mix and the same 4,096 prior samples reweighted
by exp(β_end·r) under the session's final reward (target fidelity).

  python benchmarks/align_results.py --prefer 1,4,7,9 0 3,8 2,5 --seeds 0,1,2 --out runs/results
  python benchmarks/align_results.py --prefer 0 3,8 --taste style:7:thick like:400,437,468 --final noise,noise+move:500
  python benchmarks/align_results.py --prefer 1,4,7,9 --label-noise 0,0.1 --final noise,liked:0.3
  python benchmarks/align_results.py --prior fashion --prefer 5,7,9 --out runs/fashion
  python benchmarks/align_results.py --prefer 1,4,7,9 --set sampler.weights=rate --peers ''
  python benchmarks/align_results.py --prefer 1,4,7,9 0 3,8 2,5 --final noise \
      --peers best_of_n,papa,fk_steering,das_online,seiko_ucb --out runs/peers     # the field's methods
  python benchmarks/align_results.py --summarise runs/results     # the table of the jobs finished so far

``--jobs N`` runs N (set, noise, seed) jobs at once in separate processes, one thread each:
every session is seeded, so the numbers are those of the sequential run, but the wall times
then include the contention and are only comparable within one such run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from apa.session import components
from apa.session.examples import GIVEN
from apa.session.lifecycle import FINAL, drive
from apa.config import preset
from apa.measures.novelty import users_liked
from apa.evaluation.report import report_view, write_report
from apa.session import Session, with_overrides

KEYS = ("yield", "judge_yield", "yield_per_kcall", "judge_yield_per_kcall", "preferred_confident_share",
        "judge_preferred_confident_share", "distinct", "near_copy_share", "judge_min_class_share",
        "liked_shown_late", "first_liked", "calls", "target_tv", "wall_s")
HEADS = ("yield of 256 (oracle)", "yield of 256 (judge)", "yield / 1k call rows (oracle)",
         "yield / 1k call rows (judge)", "P∧C (oracle)", "P∧C (judge)", "distinct of 256", "near-copies",
         "rarest liked class (judge)", "shown liked, round 3 on", "first liked rating", "call rows",
         "TV to reweighted prior", "wall s")
WORST = ("judge_min_class_share", "yield", "judge_yield")  # also the worst run, in brackets
REFERENCE_SAMPLES = 4096  # plain prior samples: the target-fidelity reference and the near-copy yardstick
LATE_ROUND = 2  # "round 3 on": rounds from this 0-based index count in the late share of shown images liked


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


class Final(NamedTuple):
    """A final-batch variant: where it starts, the restart fraction, a β schedule of its own, a final move."""

    start: str
    restart: float = 0.3
    beta: tuple[float, float] | None = None
    move: int | None = None


def parse_final(text: str) -> Final:
    """"noise" -> Final("noise"); "liked:0.5" -> Final("liked", 0.5); "noise@1-4" -> Final("noise", 0.3,
    (1.0, 4.0)); "noise+move:500" -> Final("noise", move=500) (``--final-move 500``)."""
    text, _, move = text.partition("+move:")
    text, _, beta = text.partition("@")
    name, _, frac = text.partition(":")
    return Final(name, float(frac) if frac else 0.3, tuple(float(b) for b in beta.split("-")) if beta else None,
                 int(move) if move else None)


def final_label(f: Final) -> str:
    return (f"fkc/{f.start}" + (f":{f.restart:g}" if f.start != "noise" else "")
            + (f"@{f.beta[0]:g}-{f.beta[1]:g}" if f.beta else "") + (f"+move:{f.move}" if f.move else ""))


def reference_particles(root: Path, prior_name: str, steps: int, n: int = REFERENCE_SAMPLES) -> Path:
    """n plain samples of the prior (clean particles [n, *event]), drawn once per benchmark run and
    shared by every job: the target-fidelity reference and the near-copy yardstick."""
    from apa.registry import PRIORS
    from apa.smc.sampler import sample_prior

    path = root / f"reference_{prior_name}_{steps}_{n}.pt"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        prior = PRIORS.create(prior_name, {"name": prior_name})
        with torch.no_grad():
            z = sample_prior(prior, n, steps, torch.Generator().manual_seed(12345), batch_size=256, decode=False)
        torch.save(z, path)
    return path


class Judges:
    """Every batch judged twice: by the simulated user's oracle (with real held-out images of the
    preferred classes for FD) and by the independent judge, which never rated anything. A taste no
    class names (``--taste``) is scored by each from its own view: the oracle's taste as the user
    holds it, the judge's the same taste fitted to the judge's network on the reference samples."""

    def __init__(self, user, prior_name: str, n_real: int, reference: torch.Tensor, decode):
        from apa.evaluation.compare import Evaluator
        from apa.evaluation.judge import load_judge
        from apa.feedback.tastes import Taste, judge_view

        self.user, self.oracle, self.judge = user, Evaluator(user, prior_name, n_real), load_judge(prior_name)
        self.prefer = tuple(user.prefer)
        self.reference = reference  # [M, *event] plain prior particles
        images = decode(reference)
        taste = user.taste  # a taste no class names (a TasteUser, perhaps inside an ErringUser), or None
        self.judge_taste = None if taste is None else Taste.fit(taste.spec, judge_view(self.judge), images,
                                                                taste.examples)
        self.prior_liked = {by: images[self.liked(images, by)] for by in ("oracle", "judge")}
        self.prior_preferred = self.prior_liked["judge"]

    def liked(self, images: torch.Tensor, by: str) -> torch.Tensor:
        """[n] bool: the evaluator ``by`` ("oracle" | "judge") likes the image: a confident preferred
        class, or the taste as it sees it."""
        if by == "oracle":
            return users_liked(self.user, images)
        if self.judge_taste is not None:
            return self.judge_taste.liked(images)
        labels, conf = self.judge.classify(images)
        return torch.isin(labels, torch.tensor(self.prefer)) & (conf >= self.judge.confidence)

    def __call__(self, images: torch.Tensor, liked: torch.Tensor, rated: torch.Tensor | None = None,
                 calls: int | None = None, seconds: float | None = None) -> dict:
        """Every number of a row for one batch of images [n, 1, 28, 28] in [0, 1], given the images
        the user liked during the session [m, 1, 28, 28], every image rated [r, ...], and the network
        call rows and seconds the method spent (for the yield per call and per second)."""
        from apa.measures.novelty import near_copies
        from apa.measures.yields import take_home

        rated = liked if rated is None else rated
        ev = self.oracle(images)
        shares = self.user.evaluate(images)["preferred_class_shares"]
        jv = self.judge.evaluate(images, self.prefer)
        masks = {by: self.liked(images, by) for by in ("oracle", "judge")}
        homes = {by: take_home(images, masks[by], rated, self.prior_liked[by], calls, seconds) for by in masks}
        row = {"fd_preferred": ev["fd_preferred"], "confident_share": ev["confident_share"],
               "preferred_confident_share": float(masks["oracle"].double().mean()),
               "judge_preferred_confident_share": float(masks["judge"].double().mean()),
               "min_class_share": min(shares.values()) if shares and self.judge_taste is None else float("nan"),
               "class_shares": shares,
               "judge_min_class_share": jv["min_class_share"] if self.judge_taste is None else float("nan"),
               "judge_class_shares": jv["class_shares_preferred"], "distinct": homes["judge"]["distinct"],
               "calls": calls, **near_copies(images[masks["judge"]], liked, self.prior_liked["judge"])}
        for by, home in homes.items():
            prefix = "" if by == "oracle" else "judge_"
            row.update({prefix + k: v for k, v in home.items() if k != "distinct"})
        return row


def target_fidelity(session, judges: Judges, images: torch.Tensor) -> dict:
    """The final batch's class mix against the reference prior samples reweighted by exp(β_end·r(x0))
    under the session's final reward (``apa.measures.novelty.final_checks``)."""
    from apa.measures.novelty import final_checks

    checks = final_checks(session.final_view(images), judges.reference)
    return {k: checks[k] for k in ("target_tv", "target_ess", "target_mix", "batch_mix")}


class PoolLabels(NamedTuple):
    """Plain prior samples as each evaluator sees them: ``liked`` {"oracle" | "judge": [n] bool}, the judge's
    ``classes`` [n] (None for a taste no class names), and the user's preferred classes."""
    liked: dict[str, torch.Tensor]
    classes: torch.Tensor | None
    prefer: tuple


def pool_labels(session, reference: torch.Tensor) -> PoolLabels:
    """The reference particles [n, *event] judged for ``session``'s user by the oracle and the judge."""
    judges = Judges(session.feedback, session.cfg.prior.name, 16, reference, session.prior.decode)
    with torch.no_grad():
        images = session.prior.decode(reference)
    classes = None if judges.judge_taste is not None else judges.judge.classify(images)[0]
    return PoolLabels({by: judges.liked(images, by) for by in ("oracle", "judge")}, classes, judges.prefer)


@contextlib.contextmanager
def copied_session(src: str | Path) -> Iterator[Session]:
    """A finished session resumed from a temporary copy of ``src`` (the original is never written); its store
    closed and the copy removed afterwards."""
    work = Path(tempfile.mkdtemp()) / "s"
    shutil.copytree(src, work)
    try:
        session = Session.resume(work, progress=False)
        try:
            yield session
        finally:
            session.store.close()
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def rated_images(session) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image rated in the session and those the user liked, decoded: ([r, C, H, W], [m, C, H, W])."""
    x, y = session.state.training_set()[:2]
    with torch.no_grad():
        images = session.prior.decode(x)
    return images, images[y > 0]


def first_liked(scores: list[float]) -> int | None:
    """The rating (1-based) that first liked an image; None when none did."""
    return next((i + 1 for i, v in enumerate(scores) if v > 0), None)


def shown_liked(shares: list) -> dict:
    """The mean share of shown images liked, over the session and from round LATE_ROUND + 1 on."""
    done = [s for s in shares if s is not None]
    late = [s for s in shares[LATE_ROUND:] if s is not None]
    return {"liked_shown": sum(done) / len(done) if done else float("nan"),
            "liked_shown_late": sum(late) / len(late) if late else float("nan"), "liked_by_round": shares}


def peer_config(name: str, equal_calls: dict[str, float], steps: int, budget: int, n: int):
    """A peer's settings: its defaults, except learned-reward best-of-M's pool, its samples at the session's
    step count and its pool set by ``equal_calls``: to the network calls of this job's ``apa`` final batch
    ("rows_per_image"), or so that its whole session spends the ``apa`` session's ("session_rows"; its
    rounds, ``budget`` plain samples each scored in the refits, cost budget·(steps + 1) of them). None: the
    peer's defaults."""
    if not name.startswith("best_of_m") or not equal_calls:
        return None
    from apa.baselines.best_of_m import BestOfMConfig

    if "session_rows" in equal_calls:
        pool_rows = equal_calls["session_rows"] - budget * (steps + 1)
        return BestOfMConfig(steps=steps, pool_per_image=pool_rows / n / (steps + 1))
    return BestOfMConfig(steps=steps, pool_per_image=equal_calls["rows_per_image"] / (steps + 1))


def peer_row(name: str, cfg, prior, user, judges: Judges, workdir: Path, equal_calls: dict[str, float]) -> dict:
    """One peer method (``apa.baselines``, its code and default settings unchanged) on the session's
    prior, simulated user, seed, budget, round size and final batch size: its row of the table."""
    from apa import baselines
    from apa.priors.calls import counting
    from apa.seeding import generator

    s = cfg.session
    t0 = time.perf_counter()
    with counting() as calls:
        config = peer_config(name, equal_calls, cfg.sampler.steps, s.budget, s.eval_samples)
        run = baselines.get(name)(prior, user, s.budget, s.per_round, s.seed, eval_samples=s.eval_samples,
                                  workdir=workdir, **({"config": config} if config else {}))
        before = calls.total
        images = run.sample(s.eval_samples, generator(s.seed, 0, "eval"))
    wall = time.perf_counter() - t0
    rated = torch.cat([images[:0]] + [rec.images for rec in run.records])
    scores = torch.cat([torch.zeros(0)] + [torch.tensor(rec.scores) for rec in run.records])
    return {**judges(images, rated[scores > 0], rated, calls.total, wall),
            **shown_liked([float((torch.tensor(rec.scores) > 0).float().mean()) for rec in run.records]),
            "first_liked": first_liked(scores.tolist()), "final_calls": calls.total - before,
            "target_tv": float("nan"), "wall_s": wall}


def job_config(prior_name: str, prefer: tuple[int, ...] | str, noise: float, seed: int, overrides: dict):
    """The session's configuration: the defaults, ``overrides``, and the job's set (classes, or a
    taste no class names) and seed."""
    taste = prefer if isinstance(prefer, str) else None
    feedback = {**overrides.get("feedback", {}), "label_noise": noise,
                **({"taste": taste} if taste else {"prefer": prefer})}
    return with_overrides(preset("default"), **{**overrides,
                                                "prior": {**overrides.get("prior", {}), "name": prior_name},
                                                "feedback": feedback,
                                                "session": {**overrides.get("session", {}), "seed": seed}})


def one_job(out: Path, prior_name: str, prefer: tuple[int, ...] | str, noise: float, seed: int, overrides: dict,
            finals: list[Final], peers: tuple[str, ...],
            reference: Path, equal: str | int = "final") -> dict:
    """One job's rows. ``equal``: best-of-M's pool at the calls of the ``apa`` final batch ("final"), of the
    whole ``apa`` session ("session"), or of a session that spent this many rows (peers-only runs)."""
    cfg = job_config(prior_name, prefer, noise, seed, overrides)
    shutil.rmtree(out, ignore_errors=True)
    rows, timings = {}, {}
    equal_calls = {"session_rows": equal} if isinstance(equal, int) else {}
    if finals:  # an apa session, its final batch drawn once per variant
        session = Session.start(out, cfg, progress=False)
        rows, equal_calls = session_rows(session, finals, reference)
        if equal == "session":
            equal_calls = {"session_rows": next(iter(rows.values()))["calls"]}
        timings = dict(session.timings)
        prior, user = session.prior, session.feedback
    else:  # the peers alone, on the same components
        prior, user = components.build(cfg)
    judges = Judges(user, prior_name, cfg.session.eval_samples, torch.load(reference), prior.decode)
    for name in peers:
        rows[name] = peer_row(name, cfg, prior, user, judges, out / name, equal_calls)
    return {"prior": prior_name, "prefer": prefer if isinstance(prefer, str) else list(prefer), "noise": noise,
            "seed": seed, "prior_liked_share": {by: judges.prior_liked[by].shape[0] / judges.reference.shape[0]
                                                for by in judges.prior_liked},
            "rows": rows, "timings": timings}


def session_rows(session, finals: list[Final],
                 reference: Path) -> tuple[dict, dict[str, float]]:
    """Run the session, then one row per final-batch variant drawn from it; saves its (first variant's)
    final batch and report. Also returns the first variant's network-call rows per final image."""
    from apa.priors.calls import counting

    cfg = session.cfg
    t0 = time.perf_counter()
    with counting() as round_calls:
        drive(session, until=FINAL)
    rounds_s = time.perf_counter() - t0
    judges = Judges(session.feedback, cfg.prior.name, cfg.session.eval_samples, torch.load(reference),
                    session.prior.decode)
    (rated, liked), seen = rated_images(session), shown_liked(session.state.liked_shares())
    first = first_liked([x["score"] for x in session.store.ratings()  # the search's: given examples are not found
                         if x["score"] is not None and x["source"] != GIVEN])
    rows, kept, equal = {}, None, {}
    for final in finals:  # each variant: the same store and networks, read with the variant's configuration
        variant_cfg = with_overrides(cfg, session={"final_start": final.start, "restart": final.restart,
                                                   "final_move": final.move},
                                     sampler={"beta": final.beta or cfg.sampler.beta})
        variant = Session(session.store, variant_cfg, session.prior, session.feedback, progress=False)
        t1 = time.perf_counter()
        with counting() as final_calls:
            images = variant.final_samples()
        wall = rounds_s + time.perf_counter() - t1
        rows[final_label(final)] = {
            **judges(images, liked, rated, round_calls.total + final_calls.total, wall), **seen,
            **target_fidelity(variant, judges, images), "first_liked": first, "final_calls": final_calls.total,
            "wall_s": wall}
        if kept is None:
            kept, equal = images, {"rows_per_image": final_calls.total / images.shape[0]}
    path = session.store.save_final(kept)
    write_report(report_view(session))
    with np.load(path) as z:
        assert z["images"].shape[0] == cfg.session.eval_samples
    return rows, equal


def equal_to(spec: str, name: str, finals: list) -> str | int:
    """``--best-of-m-calls`` for the job ``name``: "final", "session", or the call rows of the apa session
    stored for the same job in DIR (``DIR[:KEY][+ROWS]``, with ``--final ''``)."""
    if spec in ("final", "session"):
        return spec
    if finals:
        raise SystemExit("--best-of-m-calls DIR reads the apa sessions' calls from another run: use it with --final ''")
    spec, _, extra = spec.partition("+")
    folder, _, key = spec.partition(":")
    key = key or "fkc/noise+move:500"
    path = Path(folder) / "jobs" / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"--best-of-m-calls: no job {path}; run the apa sessions there first")
    row = json.loads(path.read_text())["rows"].get(key)
    if row is None:
        raise SystemExit(f"--best-of-m-calls: {path} has no row {key!r}")
    return int(row["calls"]) + int(extra or 0)


def _job(job: tuple) -> dict:
    *args, threads = job
    torch.set_num_threads(threads)
    return one_job(*args)


def summarise(values: list[float], worst: bool = False) -> str:
    """mean ± std over seeds (NaN runs left out); with ``worst``, also the lowest value in brackets."""
    values = [v for v in values if v == v]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}" + (f" ({min(values):.2f})" if worst else "")


def job_name(prior: str, prefer: tuple[int, ...] | str, noise: float, seed: int) -> str:
    """A job's file name: mnist_p1479_n0_s0, or mnist_tstyle-7-thick_n0_s0 for a taste."""
    body = "t" + re.sub(r"[^A-Za-z0-9]+", "-", prefer) if isinstance(prefer, str) else "p" + "".join(map(str, prefer))
    return f"{prior}_{body}_n{noise:g}_s{seed}"


def set_label(prefer) -> str:
    return prefer if isinstance(prefer, str) else "{" + ",".join(map(str, prefer)) + "}"


def print_table(results: list[dict]) -> None:
    print("| prior | set (prior share, judge) | label noise | method | " + " | ".join(HEADS) + " |\n|"
          + "---|" * (4 + len(HEADS)))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["prior"], set_label(r["prefer"]), r["noise"]), []).append(r)
    for (prior, label, noise), runs in groups.items():
        share = statistics.mean(r.get("prior_liked_share", {}).get("judge", float("nan")) for r in runs)
        for method in runs[0]["rows"]:
            cells = [summarise([_num(r["rows"].get(method, {}).get(k)) for r in runs], worst=k in WORST)
                     for k in KEYS]
            found = [r["rows"][method].get("first_liked") for r in runs if method in r["rows"]]
            early = sum(f is not None and f <= 40 for f in found)
            cells[KEYS.index("first_liked")] += f" [≤ 40: {early}/{len(found)}]"
            print(f"| {prior} | {label} ({share:.3f}) | {noise:g} | {method} | " + " | ".join(cells) + " |", flush=True)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="mnist", choices=("mnist", "fashion"))
    ap.add_argument("--prefer", nargs="*", default=["1,4,7,9"], help="class sets (none: the --taste ones alone)")
    ap.add_argument("--taste", nargs="*", default=[],
                    help="tastes no class names, run beside the --prefer sets: style:CLASS:MEASURE or like:I,J,...")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--label-noise", default="0", help="comma list of flip probabilities, e.g. 0,0.1")
    ap.add_argument("--final", default="noise,liked:0.3",
                    help="final-batch variants drawn from each session: noise | liked:FRACTION | balanced:FRACTION, "
                         "each with an optional @B0-B1 (β) and +move:T (--final-move T), comma list; empty: no apa "
                         "session, the --peers alone")
    ap.add_argument("--peers", default="best_of_n,best_of_m,best_of_m_is",
                    help="comma list of peer methods run beside each session (apa.baselines: best_of_n, best_of_m, "
                         "best_of_m_is, papa, "
                         "epapa, fk_steering, das_online, seiko_ucb, guidance, prior); empty for none")
    ap.add_argument("--set", nargs="*", default=[], help="overrides like sampler.beta=2,8")
    ap.add_argument("--best-of-m-calls", default="final", metavar="final|session|DIR[:KEY][+ROWS]",
                    help="learned-reward best-of-M's pool: at the network calls of the apa final batch (final), "
                         "of the whole apa session (session), or, for --final '', of the apa session of the same "
                         "job in DIR (its row KEY, default fkc/noise+move:500, plus ROWS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--jobs", type=int, default=1, help="jobs at once, in separate processes")
    ap.add_argument("--summarise", metavar="DIR",
                    help="print the table of the jobs finished so far in DIR (a run's --out, or its jobs) and exit")
    args = ap.parse_args()
    if args.summarise:
        root = Path(args.summarise)
        jobs_dir = root / "jobs" if (root / "jobs").is_dir() else root  # a run's OUT, or a folder of its jobs
        runs = [json.loads(p.read_text()) for p in sorted(jobs_dir.glob("*.json"))]
        print_table(sorted(runs, key=lambda r: (r["noise"], set_label(r["prefer"]), r["seed"])))
        return
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    finals = [parse_final(f) for f in args.final.split(",") if f]  # --final '': the peers alone
    root = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    noises = [float(p) for p in args.label_noise.split(",")]
    threads = 1 if args.jobs > 1 else args.threads
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    steps = overrides.get("sampler", {}).get("steps", preset("default").sampler.steps)
    reference = reference_particles(root, args.prior, steps)
    sets = [tuple(int(c) for c in pref.split(",")) for pref in args.prefer] + list(args.taste)
    jobs = [(root / job_name(args.prior, pref, noise, s), args.prior, pref, noise, s, overrides, finals, peers,
             reference, equal_to(args.best_of_m_calls, job_name(args.prior, pref, noise, s), finals), threads)
            for noise in noises for s in seeds for pref in sets]  # every set at one seed before the next
    print(f"prior {args.prior}, overrides {overrides}, seeds {seeds}\n", flush=True)
    done = root / "jobs"  # one JSON per finished job: a run stopped early keeps them, and a rerun skips them
    done.mkdir(parents=True, exist_ok=True)
    finished = [done / f"{j[0].name}.json" for j in jobs]
    results = [json.loads(path.read_text()) for path in finished if path.exists()]
    todo = [j for j, path in zip(jobs, finished) if not path.exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done in {done}", flush=True)
    with multiprocessing.get_context("spawn").Pool(max(args.jobs, 1)) as pool:
        for result in pool.imap_unordered(_job, todo, chunksize=1):
            name = job_name(result["prior"], result["prefer"] if isinstance(result["prefer"], str)
                            else tuple(result["prefer"]), result["noise"], result["seed"])
            (done / f"{name}.json").write_text(json.dumps(result, default=str))
            results.append(result)
    order = [j[0].name for j in jobs]
    results.sort(key=lambda r: order.index(job_name(r["prior"], r["prefer"] if isinstance(r["prefer"], str)
                                                    else tuple(r["prefer"]), r["noise"], r["seed"])))
    print_table(results)
    (root / "results.json").write_text(json.dumps({"overrides": args.set, "runs": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
