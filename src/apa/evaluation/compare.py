"""`apa compare`: every method on one prior, one simulated user and one budget schedule.

Each (method, seed) spends the largest budget once, in rounds of ``per_round`` ratings, and at
every budget of the schedule draws ``eval_samples`` images from its sampler as it stands then
(see ``apa.baselines.common``). All batches go through one evaluator: the oracle user's
``evaluate`` (preferred ∧ confident share, class histogram), coverage entropy over the
preferred classes, mean pairwise distance of the oracle's features (diversity) and the Fréchet
distance of those features to held-out real digits of the preferred classes. A row of real
training digits of the preferred classes, evaluated the same way, gives the floor of each number.

Results of each (method, seed) are cached in ``OUT/runs`` under a key of every setting that
matters, so an interrupted comparison resumes, and disjoint ``--methods`` may run in parallel
processes into one OUT; a last call with all methods then only aggregates.
Outputs: OUT/compare.json, OUT/compare.md and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apa import baselines, data
from apa.atomic import write_file
from apa.baselines.fkc import session_config
from apa.config import NUM_TIMESTEPS, AlignConfig
from apa.evaluation.compare_report import write_outputs
from apa.measures.metrics import coverage_entropy, frechet_distance, mean_pairwise_distance
from apa.measures.novelty import users_liked
from apa.measures.yields import take_home
from apa.feedback.classifier import extract_features
from apa.feedback.classifier import parse_classes
from apa.feedback.tastes import prior_pool
from apa.priors.calls import counting
from apa.priors.ddpm import weights_path
from apa.registry import FEEDBACK, METHODS, PRIORS  # METHODS: names only; a method's module loads when it runs
from apa.session.checks import validate

DEFAULT_METHODS = ("fkc", "papa", "epapa", "best_of_n", "best_of_m", "guidance", "prior")  # peers: --methods
REFERENCE = "papa@300"  # PAPA at its own budget: 300 labels, 10 per round
REFERENCE_BUDGET, REFERENCE_PER_ROUND = 300, 10
SCALARS = ("preferred_confident_share", "preferred_share", "confident_share", "coverage_entropy",
           "mean_pairwise_distance", "fd_preferred", "distinct", "yield", "yield_per_kcall", "calls")


@dataclass(frozen=True)
class CompareConfig:
    out: str
    prior: str = "mnist"
    prior_weights: str | None = None
    prefer: tuple[int, ...] = (1, 4, 7, 9)
    budgets: tuple[int, ...] = tuple(range(8, 81, 8))
    seeds: int = 3
    methods: tuple[str, ...] = DEFAULT_METHODS
    per_round: int = 8
    eval_samples: int = 128
    particles: int = 32
    steps: int = 25
    epochs: int = 200  # surrogate refit epochs per round (fkc, guidance; the seed's 200)
    papa_reference: bool = False
    papa_lr: float = 1e-5
    papa_timesteps: int = 50
    refine_t: int = 300
    yardstick: int = 2048  # plain prior samples the yield's thresholds are read on (drawn once per machine)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError(f"--methods names no method; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets must be positive rating counts, got {self.budgets}")
        if self.seeds < 1 or self.eval_samples < 2:
            raise ValueError("--seeds must be at least 1 and --eval-samples at least 2")
        for flag, v in (("--yardstick", self.yardstick), ("--per-round", self.per_round),
                        ("--particles", self.particles), ("--steps", self.steps),
                        ("--epochs", self.epochs), ("--papa-timesteps", self.papa_timesteps)):
            if v < 1:
                raise ValueError(f"{flag} must be at least 1, got {v}")
        if not (math.isfinite(self.papa_lr) and self.papa_lr > 0):
            raise ValueError(f"--papa-lr must be a positive finite number, got {self.papa_lr}")
        if not 1 <= self.refine_t < NUM_TIMESTEPS:
            raise ValueError(f"--refine-t must be a timestep from 1 to {NUM_TIMESTEPS - 1}, got {self.refine_t}")


# ---------------------------------------------------------------- parsing


def parse_budgets(text: str) -> tuple[int, ...]:
    """"8,16,24" or an arithmetic progression "8,16,...,80" -> sorted unique budgets."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            i = parts.index("...")
            if i < 2 or i != len(parts) - 2:
                raise ValueError
            a, b, end = int(parts[i - 2]), int(parts[i - 1]), int(parts[i + 1])
            if b <= a:
                raise ValueError
            values = [int(p) for p in parts[: i - 2]] + list(range(a, end + 1, b - a))
        else:
            values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected budgets like 8,16,32 or 8,16,...,80, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"budgets must be positive, got {text!r}")
    return tuple(sorted(set(values)))


# ---------------------------------------------------------------- the evaluator


class Evaluator:
    """One judge for every batch: the oracle user plus real digits of the preferred classes."""

    def __init__(self, user, dataset: str, n_real: int, seed: int = 0):
        self.user, self.classifier = user, user.classifier
        arrays = data.load(dataset)
        self.real_test = self._preferred(arrays["test_images"], arrays["test_labels"])
        train = self._preferred(arrays["train_images"], arrays["train_labels"])
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_real]
        self.real_train = train[pick]
        self.real_feats = extract_features(self.classifier, self.real_test)
        self.prior_liked = torch.zeros(0, 1, 28, 28)  # the yield's yardstick: set by ``with_yardstick``

    def with_yardstick(self, prior, n: int = 2048) -> "Evaluator":
        """Set the yield's yardstick: n plain samples of ``prior`` (drawn once per machine), those the
        simulated user likes."""
        pool = prior_pool(prior, n)
        self.prior_liked = pool[users_liked(self.user, pool)]
        return self

    def _preferred(self, images, labels):
        """Images uint8 [n, 28, 28] with labels [n] -> those of the preferred classes, [m, 1, 28, 28] in [0, 1]."""
        keep = np.isin(labels, list(self.user.prefer))
        return torch.from_numpy(data.to_unit(images[keep]))

    def take_home(self, images, rated, calls: int) -> dict[str, Any]:
        """What a person takes home from a batch [n, 1, 28, 28]: its distinct images and its liked, new,
        distinct ones (``evaluation.yields``), given the images rated so far [r, ...] and the call rows
        spent for the batch (the rounds' and its own); plain prior samples of the preferred classes
        (``feedback.tastes.prior_pool``, drawn once per machine) are the yardstick."""
        home = take_home(images, users_liked(self.user, images), rated, self.prior_liked, calls)
        return {"distinct": home["distinct"], "yield": home["yield"], "calls": calls,
                "yield_per_kcall": home.get("yield_per_kcall", 0.0)}

    def __call__(self, images) -> dict[str, Any]:
        """Every number of the comparison for images [n, 1, 28, 28] in [0, 1]."""
        ev = self.user.evaluate(images)
        feats = extract_features(self.classifier, images)
        return {**{k: ev[k] for k in ("preferred_confident_share", "preferred_share", "confident_share",
                                      "mean_score", "class_histogram")},
                "coverage_entropy": coverage_entropy(ev["class_histogram"], self.user.prefer),
                "mean_pairwise_distance": mean_pairwise_distance(feats),
                "fd_preferred": frechet_distance(feats, self.real_feats), "n": int(images.shape[0])}


# ---------------------------------------------------------------- one (method, seed)


def method_config(cc: CompareConfig, method: str) -> Any:
    """The settings a method runs with under this comparison: its registered defaults with the
    comparison's settings it takes (``registry.Method``); every other field at the method's default."""
    settings = {f.name: getattr(cc, f.name) for f in fields(cc)}
    return METHODS.method(method.split("@")[0]).settings({**settings, "prefer": tuple(cc.prefer)})


def check(cc: CompareConfig) -> None:
    """Build every method's settings (each section checks its fields) before anything is written;
    a session's settings are checked whole, as `apa align` checks them."""
    for method in all_methods(cc):
        config = method_config(cc, method)
        if isinstance(config, AlignConfig):
            budget, per_round, _ = schedule(cc, method)
            validate(session_config(config, None, budget, per_round, 0, cc.eval_samples))


def all_methods(cc: CompareConfig) -> list[str]:
    return list(cc.methods) + ([REFERENCE] if cc.papa_reference else [])


def schedule(cc: CompareConfig, method: str) -> tuple[int, int, tuple[int, ...]]:
    """(budget, per_round, checkpoints) of a method: the comparison's, or PAPA's own for the reference."""
    if method == REFERENCE:
        return REFERENCE_BUDGET, REFERENCE_PER_ROUND, (REFERENCE_BUDGET,)
    return max(cc.budgets), cc.per_round, tuple(cc.budgets)


def _as_json(x: Any) -> Any:
    """A method's settings (``method_config``) as JSON: an align configuration's ``to_dict``, another
    configuration's dataclass fields."""
    if isinstance(x, AlignConfig):
        return x.to_dict()
    return asdict(x) if is_dataclass(x) else x


def run_key(cc: CompareConfig, method: str, seed: int, weights_sha: str) -> str:
    """A hash of everything a (method, seed) result depends on."""
    what = {"method": method, "seed": seed, "schedule": schedule(cc, method), "prefer": list(cc.prefer),
            "eval_samples": cc.eval_samples, "prior": cc.prior, "weights": weights_sha, "yardstick": cc.yardstick,
            "config": _as_json(method_config(cc, method))}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    write_file(path, json.dumps(obj, indent=1, default=float).encode(), mode=0o644)


def run_one(cc: CompareConfig, method: str, seed: int, prior, user, evaluate: Evaluator, key: str) -> dict:
    """Run one (method, seed) (or load its cached result); returns its metrics per checkpoint."""
    out = Path(cc.out)
    path = out / "runs" / f"{method}_seed{seed}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    budget, per_round, checks = schedule(cc, method)
    workdir = out / "sessions" / f"{method}_seed{seed}"
    if workdir.exists():
        shutil.rmtree(workdir)  # a stale or interrupted session of an earlier call of this comparison
    fn = baselines.get(method.split("@")[0])
    with counting() as calls:
        res = fn(prior, user, budget, per_round, seed, config=method_config(cc, method), checkpoints=checks,
                 eval_samples=cc.eval_samples, workdir=workdir)
    # the rounds' rows, the evaluation batches' apart (0 for a method whose one batch serves every budget)
    align_calls = max(0, calls.total - sum(res.eval_calls.values()))
    rated = torch.cat([torch.zeros(0, 1, 28, 28)] + [r.images.float() for r in res.records])
    result = {"key": key, "method": method, "seed": seed, "align_seconds": res.seconds, "align_calls": align_calls,
              "eval_seconds": {str(k): v for k, v in res.eval_seconds.items()}, "oracle_ratings": res.oracle_ratings,
              "rounds": [{"round": r.round, "spent": r.spent, "mean_score": float(np.mean(r.scores))}
                         for r in res.records],
              "metrics": {str(b): {**evaluate(images),  # the images rated by budget b: the first b
                                   **evaluate.take_home(images, rated[:b], align_calls + res.eval_calls.get(b, 0))}
                          for b, images in sorted(res.checkpoints.items())}}
    np.savez_compressed(out / "runs" / f"{method}_seed{seed}.npz",
                        images=res.checkpoints[max(res.checkpoints)].float().numpy().astype(np.float32))
    _write_json(path, result)
    return result


# ---------------------------------------------------------------- aggregation


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per budget, per scalar metric: mean, sd, min, max over the seeds' runs."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for b in sorted({b for r in runs for b in r["metrics"]}, key=int):
        rows = [r["metrics"][b] for r in runs if b in r["metrics"]]
        out[b] = {m: _stats([row[m] for row in rows]) for m in SCALARS if all(m in row for row in rows)}
    return out


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def method_summary(runs: list[dict]) -> dict[str, Any]:
    return {"by_budget": summarise(runs), "seeds": [r["seed"] for r in runs],
            "align_seconds": _stats([r["align_seconds"] for r in runs]),
            "eval_batch_seconds": _stats([v for r in runs for v in r["eval_seconds"].values()]),
            "oracle_ratings": _stats([r["oracle_ratings"] for r in runs])}


# ---------------------------------------------------------------- the command


def weights_file(cc: CompareConfig) -> Path:
    return Path(cc.prior_weights) if cc.prior_weights else weights_path(cc.prior)


def file_sha(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"no prior weights at {path}; train them with `apa train-prior` "
                                "or pass --prior-weights")
    return data.file_sha256(path)


def compare(cc: CompareConfig, progress: bool = True) -> Path:
    """Run (or load) every (method, seed), then write compare.json, compare.md and the plots."""

    check(cc)
    out = Path(cc.out)
    sha = file_sha(weights_file(cc))
    prior = PRIORS.create(cc.prior, {"weights": cc.prior_weights})
    user = FEEDBACK.create("oracle", {"prefer": tuple(cc.prefer)}, prior)
    evaluate = Evaluator(user, cc.prior, cc.eval_samples).with_yardstick(prior, cc.yardstick)
    (out / "runs").mkdir(parents=True, exist_ok=True)  # once everything it needs is there
    methods = all_methods(cc)
    results: dict[str, list[dict]] = {}
    for method in methods:
        for seed in range(cc.seeds):
            t0 = time.perf_counter()
            r = run_one(cc, method, seed, prior, user, evaluate, run_key(cc, method, seed, sha))
            results.setdefault(method, []).append(r)
            if progress:
                final = r["metrics"][max(r["metrics"], key=int)]
                print(f"{method:>10} seed {seed}: preferred&confident {final['preferred_confident_share']:.3f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    summary = {"config": {**asdict(cc), "weights_sha256": sha}, "real": evaluate(evaluate.real_train),
               "methods": {m: method_summary(rs) for m, rs in results.items()},
               "runs": {m: rs for m, rs in results.items()}}
    return write_outputs(out, summary)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return CompareConfig(out=args.out, prior=args.prior, prior_weights=args.prior_weights,
                         prefer=parse_classes(args.prefer), budgets=args.budgets, seeds=args.seeds, methods=methods,
                         per_round=args.per_round, eval_samples=args.eval_samples, particles=args.particles,
                         steps=args.steps, epochs=args.epochs, papa_reference=args.papa_reference,
                         papa_lr=args.papa_lr, papa_timesteps=args.papa_timesteps, refine_t=args.refine_t,
                         yardstick=args.yardstick)


def thread_limit(threads: int | None):
    """Limit torch and, when threadpoolctl is installed, BLAS to ``threads`` threads (None: no limit).

    On a busy machine OpenBLAS's spinning threads make the Fréchet distance's 128x128
    eigendecompositions some hundred times slower than with one thread (measured: 1.1 s vs 6 ms).
    """
    if not threads:
        return contextlib.nullcontext()
    torch.set_num_threads(threads)
    try:  # threadpoolctl is optional: without it only torch is limited
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads)


def cmd_compare(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads} (leave it out for the libraries' choice)")
    with thread_limit(args.threads):
        path = compare(config_from_args(args))
    print(f"comparison -> {path}")


def register_cli(subparsers) -> None:
    """Add ``apa compare`` (the work happens in :func:`cmd_compare`)."""
    p = subparsers.add_parser("compare", help="FKC vs PAPA/EPAPA, best-of-N, learned-reward best-of-M, guidance "
                                              "and the prior, same budget")
    p.add_argument("--out", required=True, help="output directory (results are cached there per method and seed)")
    p.add_argument("--prior", default="mnist", choices=["mnist", "fashion"])
    p.add_argument("--prior-weights", help="a DDPM safetensors file (default: the shipped one)")
    p.add_argument("--prefer", default="1,4,7,9", help="the simulated user's preferred classes")
    p.add_argument("--budgets", type=parse_budgets, default=tuple(range(8, 81, 8)),
                   help="feedback totals to evaluate at, e.g. 8,16,...,80 (the largest is the budget)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods from {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--per-round", type=int, default=8, help="ratings per round")
    p.add_argument("--eval-samples", type=int, default=128, help="images per evaluation batch")
    p.add_argument("--particles", type=int, default=32, help="FKC / guidance particles per round")
    p.add_argument("--steps", type=int, default=25, help="sampling steps of every method")
    p.add_argument("--epochs", type=int, default=200, help="surrogate refit epochs per round (fkc, guidance)")
    p.add_argument("--papa-reference", action="store_true", help=f"add PAPA at its own budget ({REFERENCE})")
    p.add_argument("--papa-lr", type=float, default=1e-5, help="PAPA/EPAPA Adam learning rate (public code: 1e-5)")
    p.add_argument("--papa-timesteps", type=int, default=50,
                   help="stratified timesteps per image estimating PAPA's sum over all 1000 (1000: exact)")
    p.add_argument("--refine-t", type=int, default=300, help="best-of-N: SDEdit re-noising timestep")
    p.add_argument("--yardstick", type=int, default=2048,
                   help="plain prior samples (drawn once per machine) that set the yield's repeat and near-copy "
                        "thresholds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch (and BLAS) threads; 1 is fastest on a shared machine (default: the libraries' choice)")
    p.set_defaults(func=cmd_compare)
