"""How the oracle classifier is trained: augmentation, off-data it must not reward, the loss, the recipe.

Besides cross-entropy on lightly augmented real images the oracle learns a *flat* target (uniform
over the 10 classes) on off-data inputs: Gaussian and uniform noise, smooth blobs, blank images,
blends of two images of different classes (a mixed target) and real images under strong noise
(what partially denoised diffusion samples look like). A temperature is then fitted on held-out
training images. `apa train-oracle` runs this; the export writes ``apa/weights/oracle_<dataset>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from apa import data as data_mod
from apa.feedback.classifier import (NUM_CLASSES, Classifier, ClassifierConfig, export_oracle, fit_temperature,
                                     predict_proba, weights_path)
from apa.training.common import TrainConfig, load_checkpoint_model, train

ORACLE_TRAIN = TrainConfig(steps=3000, batch_size=128, lr=2e-3, warmup=100, ema_decay=0.995,
                           checkpoint_every=200, seed=0)


def _uniform(n: int, gen: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """n draws from U[lo, hi] shaped [n, 1, 1, 1], to broadcast over images."""
    return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)


def augment(x: torch.Tensor, gen: torch.Generator, degrees: float = 10.0, shift: float = 2.0) -> torch.Tensor:
    """Random small rotations (±degrees), shifts (±shift pixels) and scalings (±8%). [n,1,28,28] -> same."""
    n = x.shape[0]
    angle = math.radians(degrees) * (2 * torch.rand(n, generator=gen) - 1)
    scale = 1.0 + 0.08 * (2 * torch.rand(n, generator=gen) - 1)
    t = (2 * torch.rand(n, 2, generator=gen) - 1) * (2 * shift / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def pair_other_class(labels: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each index in idx [n], a random index of an image of a different class -> [n]."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
    other = (labels[idx] + torch.randint(1, NUM_CLASSES, idx.shape, generator=gen)) % NUM_CLASSES
    u = torch.rand(idx.shape, generator=gen)
    out = torch.empty_like(idx)
    for c in range(NUM_CLASSES):
        m = other == c
        if m.any():
            pool = by_class[c]
            if len(pool) == 0:  # a tiny subset may miss a class: fall back to any image
                pool = torch.arange(len(labels))
            out[m] = pool[(u[m] * len(pool)).long().clamp(max=len(pool) - 1)]
    return out


BLEND_ALPHA = (0.4, 0.6)  # weight of the first image in a two-class blend
NOISY_SIGMA = (0.6, 1.0)  # std of the Gaussian noise added to real images ([0, 1] units)
_SHAPE = (1, 28, 28)


def mixed_blends(images: torch.Tensor, labels: torch.Tensor, n: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixelwise weighted means α·a + (1 − α)·b of two images of different classes (α in
    BLEND_ALPHA) with their mixed targets α·e_a + (1 − α)·e_b (so no target reaches 0.9).
    -> (images [n, 1, 28, 28] in [0, 1], targets [n, NUM_CLASSES])."""
    i = torch.randint(0, len(images), (n,), generator=gen)
    j = pair_other_class(labels, i, gen)
    alpha = _uniform(n, gen, *BLEND_ALPHA)
    x = alpha * images[i] + (1 - alpha) * images[j]
    a = alpha.view(n, 1)
    target = a * F.one_hot(labels[i], NUM_CLASSES) + (1 - a) * F.one_hot(labels[j], NUM_CLASSES)
    return x, target


def blends(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """The images of :func:`mixed_blends` alone (same draws). -> [n,1,28,28]."""
    return mixed_blends(images, labels, n, gen)[0]


def overlays(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Pixelwise maxima of two images of different classes (one drawn over the other). -> [n,1,28,28]."""
    i = torch.randint(0, len(images), (n,), generator=gen)
    return torch.maximum(images[i], images[pair_other_class(labels, i, gen)])


def noisy_images(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Real images plus strong Gaussian noise (σ in NOISY_SIGMA), like early diffusion states. -> [n,1,28,28]."""
    idx = torch.randint(0, len(images), (n,), generator=gen)
    return images[idx] + _uniform(n, gen, *NOISY_SIGMA) * torch.randn((n, *_SHAPE), generator=gen)


def gaussian_noise(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Pixelwise Gaussian noise, mean in [0, 0.8], std in [0.1, 0.7]. -> [n,1,28,28] (unclipped)."""
    return _uniform(n, gen, 0.0, 0.8) + _uniform(n, gen, 0.1, 0.7) * torch.randn((n, *_SHAPE), generator=gen)


def uniform_noise(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Pixelwise uniform noise on a random sub-interval of [0, 1] at least 0.15 wide. -> [n,1,28,28]."""
    lo = _uniform(n, gen, 0.0, 0.5)
    return lo + (1 - lo) * _uniform(n, gen, 0.3, 1.0) * torch.rand((n, *_SHAPE), generator=gen)


def blobs(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random blobs: 7x7 Gaussian noise upsampled bilinearly. -> [n,1,28,28] (unclipped)."""
    coarse = torch.randn(n, 1, 7, 7, generator=gen) * _uniform(n, gen, 0.2, 0.8) + _uniform(n, gen, 0.0, 0.6)
    return F.interpolate(coarse, size=28, mode="bilinear", align_corners=False)


def constants(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Blank images of one random grey level in [0, 1]. -> [n,1,28,28]."""
    return _uniform(n, gen, 0.0, 1.0).expand(n, *_SHAPE)


OFF_DATA_KINDS = {"gaussian": gaussian_noise, "uniform": uniform_noise, "blobs": blobs, "constant": constants,
                  "blend": blends, "overlay": overlays, "noisy": noisy_images}
# what the shipped oracles train on: overlays are left out, since one digit drawn over another is
# often still a fair digit (a 1 over a 7 reads as a 7) and a flat target there costs confidence
# on real digits (measured: confident share on held-out MNIST 0.83 with them, 0.96 without)
TRAIN_OFF_KINDS = ("gaussian", "uniform", "blobs", "constant", "blend", "noisy")


def off_data(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator,
             kinds: Sequence[str] = TRAIN_OFF_KINDS) -> torch.Tensor:
    """n inputs that are no class at all, an equal share of each kind, shuffled. -> [n, 1, 28, 28] in [0, 1].

    images [m, 1, 28, 28] and labels [m] are the real data the blends and noisy images start from.
    """
    k = -(-n // len(kinds))
    x = torch.cat([OFF_DATA_KINDS[kind](images, labels, k, gen) for kind in kinds])
    return x[torch.randperm(len(x), generator=gen)[:n]].clamp(0.0, 1.0)


BLEND_TARGETS = ("flat", "mixed")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution over classes, per row. logits, target [n, C] -> [n]."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


def oracle_loss(images: torch.Tensor, labels: torch.Tensor, batch_size: int, off_fraction: float = 0.5,
                kinds: Sequence[str] = TRAIN_OFF_KINDS, blend_target: str = "flat"):
    """Loss for ``apa.training.common.train``: CE on augmented real images + CE on off-data.

    images float32 [n, 1, 28, 28] in [0, 1], labels int64 [n]. Each step draws ``batch_size`` real
    images and ``off_fraction * batch_size`` off-data inputs with the loop's generator. Off-data
    targets are flat (uniform over classes); with ``blend_target="mixed"`` the two-class blends
    instead target their classes' mixture (:func:`mixed_blends`), an equal share of the off-data.
    """
    if blend_target not in BLEND_TARGETS:
        raise ValueError(f"unknown blend_target {blend_target!r}; choose one of {', '.join(BLEND_TARGETS)}")
    n_off = max(1, int(round(off_fraction * batch_size)))
    flat_kinds = [k for k in kinds if not (blend_target == "mixed" and k == "blend")]
    n_mixed = n_off * (len(kinds) - len(flat_kinds)) // len(kinds)

    def loss_fn(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        real = augment(images[idx], gen)
        off = off_data(images, labels, n_off - n_mixed, gen, flat_kinds)
        target = torch.full((len(off), NUM_CLASSES), 1.0 / NUM_CLASSES)
        if n_mixed:
            mixed, mixed_target = mixed_blends(images, labels, n_mixed, gen)
            off, target = torch.cat([off, mixed]), torch.cat([target, mixed_target])
        dev = next(model.parameters()).device  # drawn on the CPU, trained wherever the model is
        logits = model(torch.cat([real, off]).to(dev))
        ce = F.cross_entropy(logits[:batch_size], labels[idx].to(dev))
        return ce + off_fraction * soft_cross_entropy(logits[batch_size:], target.to(dev)).mean()

    return loss_fn


@dataclass(frozen=True)
class OracleRecipe:
    """How an oracle is made: the network, the training loop, the blends' target, the calibration split."""

    train: TrainConfig = ORACLE_TRAIN
    classifier: ClassifierConfig = ClassifierConfig()
    blend_target: str = "flat"  # see oracle_loss
    validation: int = 0  # training images held out to fit the temperature on (0: no fit, T = 1)

    def settings(self) -> dict:
        return {"classifier": self.classifier.to_dict(), "train": asdict(self.train),
                "blend_target": self.blend_target, "validation": self.validation}


# the shipped oracles' recipes; the model cards apa/weights/oracle_<dataset>.md say why each
RECIPES = {
    "mnist": OracleRecipe(),
    "fashion": OracleRecipe(train=replace(ORACLE_TRAIN, steps=12_000, warmup=300, ema_decay=0.999, checkpoint_every=250),
                            classifier=ClassifierConfig(channels=(32, 64, 128), hidden=256),
                            blend_target="mixed", validation=5_000),
}


def default_recipe(dataset: str) -> OracleRecipe:
    """The recipe the shipped oracle of ``dataset`` was made with."""
    if dataset not in data_mod.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(data_mod.DATASETS)}")
    return RECIPES[dataset]


def validation_split(n: int, validation: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of n training images: (indices to train on, ``validation`` held-out indices)."""
    if not 0 <= validation < n:
        raise ValueError(f"cannot hold out {validation} of {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[validation:].sort().values, perm[:validation].sort().values


def _record_run_settings(run_dir: Path, settings: dict) -> None:
    """Write ``run_dir/oracle.json`` (classifier + training settings), or check a resumed run matches it."""
    path = Path(run_dir) / "oracle.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before["classifier"] != settings["classifier"]:
            raise ValueError(f"{run_dir} holds an oracle run with classifier {before['classifier']}, not "
                             f"{settings['classifier']}; use another run directory or the same settings")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def _training_images(arrays: dict[str, np.ndarray], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` training images in [0, 1] [n, 1, 28, 28] and their labels [n]."""
    return (torch.from_numpy(data_mod.to_unit(arrays["train_images"][:limit])),
            torch.from_numpy(arrays["train_labels"][:limit]).long())


def train_oracle(dataset: str, run_dir: Path, recipe: OracleRecipe | None = None, progress: bool = True,
                 limit: int | None = None, arrays: dict[str, np.ndarray] | None = None) -> Classifier:
    """Train (or resume, from ``run_dir/ckpt.pt``) the oracle on a dataset's training split.

    ``recipe`` defaults to the shipped oracle's (:func:`default_recipe`); its ``validation``
    images are held out for :func:`export_from_run` to fit the temperature on. ``limit`` keeps
    the first ``limit`` training images; ``arrays`` (as from ``apa.data.load``) skips loading the
    cache. Returns the EMA network (T = 1) in eval mode. The settings go to ``run_dir/oracle.json``.
    """
    recipe = recipe or default_recipe(dataset)
    arrays = arrays if arrays is not None else data_mod.load(dataset)
    images, labels = _training_images(arrays, limit)
    fit, _ = validation_split(len(images), recipe.validation)
    _record_run_settings(run_dir, {"dataset": dataset, **recipe.settings(), "train_images": len(fit),
                                   "limit": limit, "off_data_kinds": list(TRAIN_OFF_KINDS)})
    torch.manual_seed(recipe.train.seed)  # the initial weights; batches come from the loop's generator
    model = Classifier(recipe.classifier)
    loss = oracle_loss(images[fit], labels[fit], recipe.train.batch_size, blend_target=recipe.blend_target)
    return train(model, loss, recipe.train, run_dir, progress=progress).eval()


# ---------------------------------------------------------------- measuring


def _confident_share(model: nn.Module, x: torch.Tensor, confidence: float) -> float:
    return float((predict_proba(model, x).max(dim=1).values >= confidence).float().mean())



def off_data_probes(x: torch.Tensor, y: torch.Tensor, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """n images of each kind a classifier must not call a class (seeded by ``gen``), from real images
    x [m, 1, 28, 28] in [0, 1] with labels y [m]: clip(0.5 + 0.5·N(0, 1)), U[0, 1], blank images, 50/50
    blends and pixelwise maxima of two images of different classes, and images + N(0, 0.5²)."""
    i = torch.randint(0, len(x), (n,), generator=gen)
    j = pair_other_class(y, i, gen)
    shape = (n, 1, 28, 28)
    return {"gaussian_noise": (0.5 + 0.5 * torch.randn(shape, generator=gen)).clamp(0, 1),
            "uniform_noise": torch.rand(shape, generator=gen),
            "blank": torch.rand(n, 1, 1, 1, generator=gen).expand(shape).contiguous(),
            "blend_mean": 0.5 * (x[i] + x[j]), "blend_max": torch.maximum(x[i], x[j]),
            "noisy_sigma_0.5": (x[i] + 0.5 * torch.randn(shape, generator=gen)).clamp(0, 1)}

def oracle_report(model: nn.Module, arrays: dict[str, np.ndarray], n: int = 1000, confidence: float = 0.9,
                  seed: int = 1234) -> dict:
    """What the model card records: held-out accuracy and confident shares on off-data probes.

    Probes (``n`` each, seeded): pure Gaussian noise clip(0.5 + 0.5·N(0, 1)) (a decoded x_T of
    the DDPM), uniform noise U[0, 1], blank images (constants in [0, 1]), 50/50 blends and
    pixelwise maxima of held-out images of two different classes, and held-out images plus
    N(0, 0.5²) noise.
    """
    gen = torch.Generator().manual_seed(seed)
    test_x = torch.from_numpy(data_mod.to_unit(arrays["test_images"]))
    test_y = torch.from_numpy(arrays["test_labels"]).long()
    probs = predict_proba(model, test_x)
    probes = off_data_probes(test_x, test_y, n, gen)
    report = {"test_images": len(test_x),
              "test_accuracy": float((probs.argmax(1) == test_y).float().mean()),
              "test_confident_share": float((probs.max(1).values >= confidence).float().mean())}
    for name, x in probes.items():
        report[f"confident_share_{name}"] = _confident_share(model, x, confidence)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


# ---------------------------------------------------------------- shipping and loading


def export_from_run(dataset: str, run_dir: Path, path: Path | None = None,
                    arrays: dict[str, np.ndarray] | None = None) -> tuple[Path, dict]:
    """Export a training run's EMA weights as the dataset's oracle, measured by :func:`oracle_report`.

    Returns (path written, the info stored in its metadata: run settings, steps, training seconds,
    parameter count and the report's measurements).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "ckpt.pt").exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir}; train first with `apa train-oracle --dataset {dataset}`")
    settings = json.loads((run_dir / "oracle.json").read_text())
    model, run = load_checkpoint_model(Classifier(ClassifierConfig.from_dict(settings["classifier"])), run_dir)
    model.eval()
    arrays = arrays if arrays is not None else data_mod.load(dataset)
    calibration = {}
    if settings.get("validation", 0):
        images, labels = _training_images(arrays, settings.get("limit"))
        _, held = validation_split(len(images), settings["validation"])
        with torch.no_grad():
            logits = torch.cat([model(x) for x in images[held].split(1024)])
        t = fit_temperature(logits, labels[held])
        model.config = replace(model.config, temperature=t)
        calibration = {"temperature": round(t, 4),
                       "validation_nll_at_1": round(float(F.cross_entropy(logits, labels[held])), 4),
                       "validation_nll": round(float(F.cross_entropy(logits / t, labels[held])), 4)}
    info = {**settings, "steps": run["step"], "train_seconds": round(run["elapsed"], 1),
            "params": sum(p.numel() for p in model.parameters()), **calibration, **oracle_report(model, arrays)}
    return export_oracle(model, path or weights_path(dataset), dataset, info), info


# ---------------------------------------------------------------- the simulated user
