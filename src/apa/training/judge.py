"""How the judge is trained and measured: its data split, its "none" inputs, the loss, the export.

The split is a seeded per-class reshuffle of the dataset's train and test images taken together
(:func:`pool`, :func:`judge_split`), so the judge sees other images than the oracle and keeps its own
held-out set. The 11th output, NONE, learns from real images of the other dataset (Fashion-MNIST for
the MNIST judge and the reverse, :func:`other_split`) and from the oracle recipe's synthetic
off-data (``apa.training.oracle.off_data``: noise, blobs, blanks, two-class blends, noisy images).
`apa train-judge` runs :func:`train_judge` then :func:`export_from_run`, which fits a temperature on
calibration images and records :func:`judge_report` and :func:`oracle_report` in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from apa import data as data_mod
from apa.evaluation.judge import NONE, NUM_CLASSES, Judge, JudgeConfig, JudgeNet, export_judge, weights_path
from apa.feedback.classifier import fit_temperature, load_oracle, predict_proba
from apa.priors.ddpm import load_prior
from apa.smc.sampler import sample_prior
from apa.training.common import TrainConfig, load_checkpoint_model, train
from apa.training.oracle import (TRAIN_OFF_KINDS, augment, default_recipe as oracle_recipe, off_data, off_data_probes,
                                 validation_split)

JUDGE_TRAIN = TrainConfig(steps=1200, batch_size=128, lr=2e-3, warmup=100, ema_decay=0.995, checkpoint_every=100,
                          seed=0)
OTHER_DATASET = {"mnist": "fashion", "fashion": "mnist"}  # whose real images train NONE


@dataclass(frozen=True)
class JudgeRecipe:
    """How a judge is made: the network, the loop, the split (per class) and the NONE inputs per step."""

    train: TrainConfig = JUDGE_TRAIN
    net: JudgeConfig = JudgeConfig()
    held_out_per_class: int = 150  # the judge's own test images, never trained or calibrated on
    calibration_per_class: int = 50  # fit the temperature, never trained on
    train_per_class: int | None = None  # None: every remaining image
    other_train: int = 20_000  # images of the other dataset's train split trained as NONE
    other_calibration: int = 250  # more of them (disjoint) in the calibration set
    other_per_step: int = 32  # NONE inputs per step: real images of the other dataset
    synthetic_per_step: int = 32  # and synthetic off-data
    split_seed: int = 1  # the oracle's split uses seed 0

    def settings(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("train", "net")},
                "net": self.net.to_dict(), "train": asdict(self.train)}


RECIPES = {
    "mnist": JudgeRecipe(),  # 10,000 digits: 1,500 held out, 500 calibration, 8,000 trained
    "fashion": JudgeRecipe(held_out_per_class=300, calibration_per_class=100, train_per_class=2_000,
                           other_train=8_000, other_calibration=500),
}


def default_recipe(dataset: str) -> JudgeRecipe:
    """The recipe the shipped judge of ``dataset`` was made with."""
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[dataset]


# ---------------------------------------------------------------- which images


def pool(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The train images, then the test images, of ``apa.data.load``: (uint8 [n, 28, 28], labels [n]).

    Index i < len(train_images) is train image i; the rest are test images, in their order.
    """
    return (np.concatenate([arrays["train_images"], arrays["test_images"]]),
            np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64))


def judge_split(labels: np.ndarray, held_out: int, calibration: int, train: int | None = None,
                seed: int = 1) -> dict[str, np.ndarray]:
    """A seeded per-class split of pool indices: for each class, a permutation of its images gives
    ``held_out``, then ``calibration``, then ``train`` (None: all the rest). -> sorted int64 arrays
    {"held_out", "calibration", "train"}, disjoint. labels [n]."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"held_out": [], "calibration": [], "train": []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < held_out + calibration + (train or 1):
            raise ValueError(f"class {c} has {len(idx)} images, too few for {held_out} held out, {calibration} "
                             f"calibration and {train or 'some'} to train on")
        end = None if train is None else held_out + calibration + train
        for name, part in zip(parts, (idx[:held_out], idx[held_out:held_out + calibration],
                                      idx[held_out + calibration:end])):
            parts[name].append(part)
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


def other_split(n: int, train: int, calibration: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Indices into the other dataset's train split: a seeded permutation's first ``train``, then
    ``calibration`` -> sorted int64 arrays {"train", "calibration"}."""
    if train + calibration > n:
        raise ValueError(f"cannot take {train} + {calibration} of {n} images of the other dataset")
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": np.sort(perm[:train]), "calibration": np.sort(perm[train:train + calibration])}


def index_digest(idx: np.ndarray) -> str:
    """sha256 of an index array as int64 bytes (what the metadata records of each split part)."""
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data_mod.to_unit(images))


@dataclass(frozen=True)
class JudgeData:
    """The tensors one judge trains, calibrates and is measured on (all in [0, 1], [n, 1, 28, 28])."""

    train: tuple[torch.Tensor, torch.Tensor]  # images, labels 0..9
    calibration: tuple[torch.Tensor, torch.Tensor]
    held_out: tuple[torch.Tensor, torch.Tensor]
    other_train: torch.Tensor  # real NONE images
    other_calibration: torch.Tensor
    other_test: torch.Tensor  # the other dataset's test split: a probe never trained on
    split: dict  # counts and sha256 of every index part, and the overlap with the oracle's split
    held_out_oracle_unseen: torch.Tensor | None = None  # [m] bool: held-out images the oracle never trained on


def judge_data(dataset: str, recipe: JudgeRecipe, arrays: dict | None = None, other: dict | None = None) -> JudgeData:
    """The judge's images by its recipe's split. ``arrays`` / ``other``: ``apa.data.load`` of the
    dataset and of :data:`OTHER_DATASET` (loaded when not given)."""
    arrays = arrays if arrays is not None else data_mod.load(dataset)
    other = other if other is not None else data_mod.load(OTHER_DATASET[dataset])
    images, labels = pool(arrays)
    parts = judge_split(labels, recipe.held_out_per_class, recipe.calibration_per_class, recipe.train_per_class,
                        recipe.split_seed)
    o = other_split(len(other["train_images"]), recipe.other_train, recipe.other_calibration, recipe.split_seed)
    take = {name: (_unit(images[idx]), torch.from_numpy(labels[idx])) for name, idx in parts.items()}
    oracle_seen = oracle_training_indices(dataset, len(arrays["train_images"]))
    split = {"pool": f"{dataset} train images then test images ({len(arrays['train_images'])} + "
                     f"{len(arrays['test_images'])})", "seed": recipe.split_seed,
             **{name: {"count": len(idx), "sha256": index_digest(idx)} for name, idx in parts.items()},
             "other_dataset": OTHER_DATASET[dataset],
             **{f"other_{name}": {"count": len(idx), "sha256": index_digest(idx)} for name, idx in o.items()},
             "oracle_overlap": {f"{name}_in_oracle_train": int(np.isin(idx, oracle_seen).sum())
                                for name, idx in parts.items()}}
    return JudgeData(take["train"], take["calibration"], take["held_out"], _unit(other["train_images"][o["train"]]),
                     _unit(other["train_images"][o["calibration"]]), _unit(other["test_images"]), split,
                     torch.from_numpy(~np.isin(parts["held_out"], oracle_seen)))


def oracle_training_indices(dataset: str, n_train: int) -> np.ndarray:
    """The pool indices the shipped oracle trained on: its recipe's split of the train images (the
    test images it never saw)."""
    held = oracle_recipe(dataset).validation
    return validation_split(n_train, held)[0].numpy() if held else np.arange(n_train)


# ---------------------------------------------------------------- training


def judge_loss(images: torch.Tensor, labels: torch.Tensor, other: torch.Tensor, batch_size: int,
               other_per_step: int, synthetic_per_step: int):
    """Loss for ``apa.training.common.train``: cross-entropy over 11 outputs on one batch of
    ``batch_size`` augmented real images (their class), ``other_per_step`` augmented images of the
    other dataset and ``synthetic_per_step`` off-data inputs (both NONE), drawn with the loop's
    generator. images [n, 1, 28, 28] in [0, 1], labels [n], other [m, 1, 28, 28]."""

    def loss_fn(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        jdx = torch.randint(0, len(other), (other_per_step,), generator=gen)
        x = torch.cat([augment(images[idx], gen), augment(other[jdx], gen),
                       off_data(images, labels, synthetic_per_step, gen)])
        y = torch.cat([labels[idx], torch.full((other_per_step + synthetic_per_step,), NONE, dtype=torch.long)])
        dev = next(model.parameters()).device  # drawn on the CPU, trained wherever the model is
        return F.cross_entropy(model(x.to(dev), generator=gen), y.to(dev))

    return loss_fn


def train_judge(dataset: str, run_dir: Path, recipe: JudgeRecipe | None = None, progress: bool = True,
                prepared: JudgeData | None = None) -> JudgeNet:
    """Train (or resume, from ``run_dir/ckpt.pt``) a judge by ``recipe`` (default: the shipped one's).

    The settings and the split's record go to ``run_dir/judge.json``. Returns the EMA network (T = 1).
    """
    recipe = recipe or default_recipe(dataset)
    d = prepared or judge_data(dataset, recipe)
    settings = {"dataset": dataset, **recipe.settings(), "off_data_kinds": list(TRAIN_OFF_KINDS), "split": d.split}
    path = Path(run_dir) / "judge.json"
    if path.exists() and json.loads(path.read_text())["net"] != settings["net"]:
        raise ValueError(f"{run_dir} holds a judge run with another network; use another run directory")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))
    torch.manual_seed(recipe.train.seed)  # the initial weights; batches come from the loop's generator
    model = JudgeNet(recipe.net)
    loss = judge_loss(*d.train, d.other_train, recipe.train.batch_size, recipe.other_per_step,
                      recipe.synthetic_per_step)
    return train(model, loss, recipe.train, run_dir, progress=progress).eval()


# ---------------------------------------------------------------- measuring


def calibration_set(d: JudgeData, seed: int = 4321) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration images with their labels, the other dataset's calibration images (NONE) and as
    many synthetic off-data inputs (NONE, seeded). -> (images [k, 1, 28, 28], labels [k])."""
    x, y = d.calibration
    n_other = len(d.other_calibration)
    synthetic = off_data(x, y, n_other, torch.Generator().manual_seed(seed))
    none = torch.full((2 * n_other,), NONE, dtype=torch.long)
    return torch.cat([x, d.other_calibration, synthetic]), torch.cat([y, none])


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[k, 1, 28, 28] -> logits [k, 11] at the model's temperature (CPU)."""
    return torch.cat([model(x) for x in images.split(chunk)])


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of the top output: Σ_b (n_b / n) |accuracy_b − confidence_b| over equal-width confidence
    bins. probs [n, C], labels [n]."""
    conf, pred = probs.max(dim=1)
    b = (conf * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for k in range(bins):
        m = b == k
        if m.any():
            ece += float(m.float().mean()) * abs(float((pred[m] == labels[m]).float().mean()) - float(conf[m].mean()))
    return ece


def judge_report(judge: Judge, d: JudgeData, n: int = 1000, seed: int = 1234) -> dict:
    """What the model card records: held-out accuracy, confidence and calibration, per class, and
    the confident (a class at >= 0.9) and NONE shares on non-class probes (``n`` each, seeded):
    clip(0.5 + 0.5·N(0, 1)), U[0, 1], blank images, 50/50 blends and pixelwise maxima of held-out
    images of two different classes, held-out images + N(0, 0.5²), and the other dataset's test images."""
    x, y = d.held_out
    probs = judge.probabilities(x)
    conf, pred = probs.max(1)
    confident = (pred != NONE) & (conf >= judge.confidence)
    gen = torch.Generator().manual_seed(seed)
    probes = {**off_data_probes(x, y, n, gen),
              "other_dataset": d.other_test[torch.randperm(len(d.other_test), generator=gen)[:n]]}
    report = {"held_out_images": len(y), "held_out_accuracy": float((pred == y).float().mean()),
              "held_out_confident_share": float(confident.float().mean()),
              "held_out_accuracy_of_confident": float((pred[confident] == y[confident]).float().mean())
                                                if confident.any() else None,
              "held_out_none_share": float((pred == NONE).float().mean()),
              "held_out_nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), y)),
              "held_out_ece": expected_calibration_error(probs, y),
              "held_out_accuracy_by_class": [round(float((pred[y == c] == c).float().mean()), 4) for c in range(NUM_CLASSES)],
              "held_out_confident_by_class": [round(float(confident[y == c].float().mean()), 4) for c in range(NUM_CLASSES)]}
    for name, px in probes.items():
        labels, c = judge.classify(px)
        report[f"confident_share_{name}"] = float(((labels != NONE) & (c >= judge.confidence)).float().mean())
        report[f"none_share_{name}"] = float((labels == NONE).float().mean())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


def oracle_report(judge: Judge, d: JudgeData, dataset: str, n: int = 512, steps: int = 25, seed: int = 0,
                  batch_size: int = 64, confidence: float = 0.9) -> dict:
    """The judge beside the shipped oracle.

    On the held-out images neither network trained on (``d.held_out_oracle_unseen``): each one's
    errors and the errors they share. On the shipped prior's plain samples, the same images as
    ``apa sample --prior <dataset> -n 512 --steps 25 --seed 0`` (batch size 64): confident shares
    and agreement. agreement_verdict: both say "confidently class c" for the same c, or both say
    "not confidently any class" (the oracle: max probability < 0.9; the judge: NONE or below 0.9);
    agreement_top_class: the judge's top output is the oracle's top class.
    """
    oracle = load_oracle(dataset)
    report = {}
    if d.held_out_oracle_unseen is not None:
        x, y = (t[d.held_out_oracle_unseen] for t in d.held_out)
        j_wrong, o_wrong = judge.classify(x)[0] != y, predict_proba(oracle, x).argmax(1) != y
        report = {"unseen_images": len(y), "unseen_judge_errors": int(j_wrong.sum()),
                  "unseen_oracle_errors": int(o_wrong.sum()), "unseen_shared_errors": int((j_wrong & o_wrong).sum())}
    images = sample_prior(load_prior(dataset), n, steps, torch.Generator().manual_seed(seed), batch_size).float()
    o_conf, o_pred = predict_proba(oracle, images).max(1)
    j_pred, j_conf = judge.classify(images)
    o_verdict = torch.where(o_conf >= confidence, o_pred, NONE)
    j_verdict = torch.where(j_conf >= judge.confidence, j_pred, NONE)
    shares = judge.evaluate(images, range(NUM_CLASSES))
    return {**report, "prior_samples": {"n": n, "steps": steps, "seed": seed, "batch_size": batch_size},
            "prior_confident_share": shares["confident_share"], "prior_none_share": shares["none_share"],
            "prior_class_shares": shares["class_shares"],
            "prior_oracle_confident_share": round(float((o_conf >= confidence).float().mean()), 4),
            "prior_agreement_verdict": round(float((o_verdict == j_verdict).float().mean()), 4),
            "prior_agreement_top_class": round(float((o_pred == j_pred).float().mean()), 4),
            "prior_oracle_only_confident": round(float(((o_verdict != NONE) & (j_verdict == NONE)).float().mean()), 4),
            "prior_judge_only_confident": round(float(((j_verdict != NONE) & (o_verdict == NONE)).float().mean()), 4)}


# ---------------------------------------------------------------- shipping


def export_from_run(dataset: str, run_dir: Path, path: Path | None = None, prepared: JudgeData | None = None,
                    compare_oracle: bool = True) -> tuple[Path, dict]:
    """Export a run's EMA weights as the dataset's judge, with a temperature fitted on
    :func:`calibration_set` and the measurements of :func:`judge_report` (and, with
    ``compare_oracle``, :func:`oracle_report`). Returns (path written, the info in its metadata)."""
    run_dir = Path(run_dir)
    if not (run_dir / "ckpt.pt").exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir}; train first with `apa train-judge --dataset {dataset}`")
    settings = json.loads((run_dir / "judge.json").read_text())
    model, run = load_checkpoint_model(JudgeNet(JudgeConfig.from_dict(settings["net"])), run_dir)
    model.eval()
    recipe = replace(default_recipe(dataset), **{k: settings[k] for k in ("held_out_per_class", "calibration_per_class",
                     "train_per_class", "other_train", "other_calibration", "split_seed")})
    d = prepared or judge_data(dataset, recipe)
    cx, cy = calibration_set(d)
    logits = logits_of(model, cx)
    t = fit_temperature(logits, cy)
    model.config = replace(model.config, temperature=t)
    judge = Judge(model, dataset)
    info = {**settings, "steps": run["step"], "train_seconds": round(run["elapsed"], 1),
            "params": sum(p.numel() for p in model.parameters()), "temperature": round(t, 4),
            "calibration_images": len(cy), "calibration_nll_at_1": round(float(F.cross_entropy(logits, cy)), 4),
            "calibration_nll": round(float(F.cross_entropy(logits / t, cy)), 4), **judge_report(judge, d),
            **(oracle_report(judge, d, dataset) if compare_oracle else {})}
    return export_judge(model, path or weights_path(dataset), dataset, info), info
