"""A simulated user: a small classifier (the oracle) plus a set of preferred classes.

The oracle is a compact CNN trained on the dataset's training split. It must not reward what is
not a digit (or garment): besides cross-entropy on lightly augmented real images it learns a
*flat* target (uniform over the 10 classes) on off-data inputs — Gaussian and uniform noise,
smooth blobs, blank images, blends of two images of different classes, and real images under
strong noise (what partially denoised diffusion samples look like). Its measured behaviour is
recorded in the model cards ``apa/weights/oracle_<dataset>.md`` and in the weights' metadata.

:class:`OracleUser` turns the classifier into feedback: in ``binary`` mode (PAPA's) an image
scores +1 when the predicted class is preferred and the prediction is confident, else -1; in
``graded`` mode it scores the probability mass on the preferred classes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from apa import data as data_mod
from apa.registry import FEEDBACK
from apa.training import TrainConfig, load_checkpoint_model, train

NUM_CLASSES = 10
MODES = ("binary", "graded")
ORACLE_TRAIN = TrainConfig(steps=3000, batch_size=128, lr=2e-3, warmup=100, ema_decay=0.995,
                           checkpoint_every=200, seed=0)


# ---------------------------------------------------------------- the network


@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, int, int] = (16, 32, 64)  # widths at 28x28, 14x14, 7x7
    hidden: int = 128  # width of the penultimate layer (the features)
    num_classes: int = NUM_CLASSES
    temperature: float = 1.0  # the logits are divided by it; fitted after training (see fit_temperature)

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return cls(**{**d, "channels": tuple(d["channels"])})


class Classifier(nn.Module):
    """A small CNN: images [N, 1, 28, 28] in [0, 1] -> logits [N, 10].

    Three blocks of (conv3x3, ReLU) x2 + max-pool (28 -> 14 -> 7 -> 3), then a hidden layer whose
    ReLU activations are the ``features`` used for Fréchet distance and diversity.
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [], 1
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Linear(c_in * 3 * 3, config.hidden)
        self.head = nn.Linear(config.hidden, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations. [N, 1, 28, 28] in [0, 1] -> [N, hidden]."""
        h = self.body(x - 0.5)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 28, 28] in [0, 1] -> logits [N, num_classes], divided by the temperature."""
        return self.head(self.features(x)) / self.config.temperature


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Softmax probabilities of a classifier, in chunks. [k, 1, 28, 28] -> [k, 10] (float32, CPU)."""
    device = next(model.parameters()).device
    out = [F.softmax(model(x.to(device, torch.float32)).float(), dim=1).cpu() for x in images.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES)


@torch.no_grad()
def extract_features(model: Classifier, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The classifier's features in chunks. [k, 1, 28, 28] -> [k, hidden] (CPU)."""
    device = next(model.parameters()).device
    return torch.cat([model.features(x.to(device, torch.float32)).cpu() for x in images.split(chunk)])


# ---------------------------------------------------------------- training inputs


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
    """Loss for ``apa.training.train``: CE on augmented real images + CE on off-data.

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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling: the T in [0.2, 5] minimising the mean NLL of softmax(logits / T).

    logits [n, C] (at T = 1), labels [n]. A grid of 801 points evenly spaced in log T (steps of 0.4%).
    """
    temps = torch.exp(torch.linspace(math.log(0.2), math.log(5.0), 801, dtype=torch.float64))
    lg = logits.double()
    nll = torch.stack([F.cross_entropy(lg / t, labels) for t in temps])
    return float(temps[int(nll.argmin())])


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
    i = torch.randint(0, len(test_x), (n,), generator=gen)
    j = pair_other_class(test_y, i, gen)
    shape = (n, 1, 28, 28)
    probes = {"gaussian_noise": (0.5 + 0.5 * torch.randn(shape, generator=gen)).clamp(0, 1),
              "uniform_noise": torch.rand(shape, generator=gen),
              "blank": torch.rand(n, 1, 1, 1, generator=gen).expand(shape).contiguous(),
              "blend_mean": 0.5 * (test_x[i] + test_x[j]),
              "blend_max": torch.maximum(test_x[i], test_x[j]),
              "noisy_sigma_0.5": (test_x[i] + 0.5 * torch.randn(shape, generator=gen)).clamp(0, 1)}
    report = {"test_images": len(test_x),
              "test_accuracy": float((probs.argmax(1) == test_y).float().mean()),
              "test_confident_share": float((probs.max(1).values >= confidence).float().mean())}
    for name, x in probes.items():
        report[f"confident_share_{name}"] = _confident_share(model, x, confidence)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


# ---------------------------------------------------------------- shipping and loading


def weights_path(dataset: str) -> Path:
    """Where the shipped oracle of a dataset lives: ``apa/weights/oracle_<dataset>.safetensors``."""
    return Path(str(resources.files("apa") / "weights" / f"oracle_{dataset}.safetensors"))


def export_oracle(model: Classifier, path: Path, dataset: str, info: dict) -> Path:
    """Write an oracle's weights as safetensors (metadata: classifier config, dataset, training info)."""
    meta = {"classifier": json.dumps(model.config.to_dict()), "dataset": dataset, "info": json.dumps(info)}
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return Path(path)


def oracle_metadata(dataset: str = "mnist", path: Path | None = None) -> dict:
    """The metadata of a shipped (or given) oracle file: classifier config, dataset, info (decoded)."""
    path = Path(path) if path is not None else weights_path(dataset)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return {"classifier": json.loads(meta["classifier"]), "dataset": meta["dataset"], "info": json.loads(meta["info"])}


def load_oracle(dataset: str = "mnist", path: Path | None = None) -> Classifier:
    """The shipped (or a given) oracle classifier in eval mode, gradients off.

    Raises FileNotFoundError naming the path it looked at and how to make the file.
    """
    path = Path(path) if path is not None else weights_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no oracle weights at {path}; train them with `apa train-oracle --dataset {dataset}` "
                                "or pass the oracle_weights option")
    meta = oracle_metadata(dataset, path)
    model = Classifier(ClassifierConfig.from_dict(meta["classifier"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


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


def _class_key(name: str) -> str:
    """A class name as matched: case-insensitive, spaces, hyphens and underscores alike."""
    return re.sub(r"[\s_-]+", " ", str(name).strip().lower())


def parse_classes(prefer: int | str | Iterable[int | str], names: Sequence[str] = ()) -> tuple[int, ...]:
    """A preference set from ints, class names or a string such as "1,4,7,9" or "sandal,sneaker,ankle-boot"
    -> sorted unique tuple of class indices.

    Names are resolved against ``names`` (the dataset's class names, e.g. ``apa.data.class_names("fashion")``),
    case-insensitive, with spaces, hyphens and underscores equivalent; a name with a slash ("T-shirt/top")
    also answers to each of its parts. Raises ValueError for an empty set, an unknown name, or a class
    outside 0..9.
    """
    if isinstance(prefer, str):
        items: list = [p for p in prefer.split(",") if p.strip()]
    elif isinstance(prefer, (int, np.integer)):
        items = [prefer]
    else:
        items = list(prefer)
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        lookup[_class_key(name)] = i
        for part in str(name).split("/"):
            lookup.setdefault(_class_key(part), i)
    classes = set()
    for item in items:
        text = str(item).strip()
        if isinstance(item, (int, np.integer)) or re.fullmatch(r"-?\d+", text):
            classes.add(int(text))
        elif _class_key(text) in lookup:
            classes.add(lookup[_class_key(text)])
        elif names:
            raise ValueError(f"unknown class name {text!r} in the preference set; the classes are "
                             + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
        else:
            raise ValueError(f"preference set {prefer!r} is not a comma-separated list of class indices "
                             f"such as '1,4,7,9' (class names need the dataset's names)")
    classes = tuple(sorted(classes))
    if not classes:
        raise ValueError(f"the preference set is empty; give class indices in 0..{NUM_CLASSES - 1}")
    bad = [c for c in classes if not 0 <= c < NUM_CLASSES]
    if bad:
        raise ValueError(f"unknown class(es) {bad} in the preference set; valid classes are 0..{NUM_CLASSES - 1}")
    return classes


class OracleUser:
    """A simulated user: the oracle classifier and the classes this user likes.

    ``__call__(images [k, 1, 28, 28] in [0, 1]) -> scores [k]``:
    - ``binary`` (PAPA's feedback): +1 when the predicted class is preferred and its probability
      is at least ``confidence``, else -1;
    - ``graded``: the probability mass on the preferred classes, in [0, 1].
    """

    def __init__(self, classifier: nn.Module, prefer: int | str | Iterable[int], mode: str = "binary",
                 confidence: float = 0.9, name: str | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown oracle mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 < confidence <= 1.0:
            raise ValueError(f"confidence must be in (0, 1], got {confidence}")
        self.classifier = classifier
        self.prefer = parse_classes(prefer)
        self.mode = mode
        self.confidence = float(confidence)
        self.name = name or f"oracle[{','.join(map(str, self.prefer))}]"
        self._mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        self._mask[list(self.prefer)] = True

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[k, 1, 28, 28] in [0, 1] -> class probabilities [k, 10] (CPU)."""
        return predict_proba(self.classifier, images)

    def scores_from_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Class probabilities [k, 10] -> scores [k] under this user's mode."""
        if self.mode == "graded":
            return probs[:, self._mask].sum(dim=1)
        top, pred = probs.max(dim=1)
        liked = self._mask[pred] & (top >= self.confidence)
        return liked.float() * 2.0 - 1.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, 1, 28, 28] in [0, 1] -> scores [k] float32 (on the images' device)."""
        return self.scores_from_probs(self.probabilities(images)).to(images.device)

    def evaluate(self, images: torch.Tensor) -> dict:
        """Report on samples [k, 1, 28, 28]: shares of preferred / confident predictions and histograms.

        ``class_histogram`` counts confident predictions per class (10 counts);
        ``preferred_class_shares`` maps each preferred class to its share among the samples that
        are both preferred and confident (0 for all when there are none).
        """
        probs = self.probabilities(images)
        top, pred = probs.max(dim=1)
        confident = top >= self.confidence
        preferred = self._mask[pred]
        both = preferred & confident
        hist = torch.bincount(pred[confident], minlength=NUM_CLASSES)
        n_both = int(both.sum())
        k = max(len(pred), 1)
        return {"n": len(pred), "preferred": list(self.prefer),
                "preferred_share": float(preferred.sum()) / k,
                "confident_share": float(confident.sum()) / k,
                "preferred_confident_share": n_both / k,
                "mean_score": float(self.scores_from_probs(probs).mean()) if len(pred) else 0.0,
                "class_histogram": [int(c) for c in hist],
                "preferred_class_shares": {c: (int(hist[c]) / n_both if n_both else 0.0) for c in self.prefer}}


class UnionUser:
    """Several simulated users answering as one: each image scores the maximum over the users."""

    def __init__(self, users: Sequence[OracleUser], name: str | None = None):
        if not users:
            raise ValueError("union() needs at least one user")
        self.users = list(users)
        self.name = name or "union(" + " | ".join(u.name for u in self.users) + ")"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, 1, 28, 28] -> scores [k]: the maximum of the users' scores."""
        return torch.stack([u(images) for u in self.users]).max(dim=0).values

    def evaluate(self, images: torch.Tensor) -> dict:
        """Each user's report under ``per_user``; when all users share one classifier, mode and
        confidence, also the report of one user preferring the union of their classes (top level)."""
        report: dict = {"per_user": {u.name: u.evaluate(images) for u in self.users}}
        first = self.users[0]
        if all(u.classifier is first.classifier and u.mode == first.mode and u.confidence == first.confidence
               for u in self.users):
            merged = OracleUser(first.classifier, [c for u in self.users for c in u.prefer], first.mode,
                                first.confidence)
            report.update(merged.evaluate(images))
        return report


def union(users: Sequence[OracleUser]) -> UnionUser:
    """A feedback source whose score is the maximum over several users' scores."""
    return UnionUser(users)


@FEEDBACK.register("oracle")
def make_oracle(options: dict, prior) -> OracleUser:
    """The ``oracle`` feedback: options ``prefer`` (ints, names or "1,4,7,9" / "sandal,sneaker", required), ``mode``
    ("binary" | "graded", default binary), ``confidence`` (default 0.9), ``dataset`` (default the
    prior's name when it is mnist/fashion, else mnist), ``oracle_weights`` (a path, optional)."""
    if options.get("prefer") is None:
        raise ValueError("the oracle feedback needs a preference set: set prefer, e.g. prefer=1,4,7,9")
    default = getattr(prior, "name", "mnist")
    dataset = options.get("dataset") or (default if default in data_mod.DATASETS else "mnist")
    if dataset not in data_mod.DATASETS:
        raise ValueError(f"unknown oracle dataset {dataset!r}; choose one of {', '.join(data_mod.DATASETS)}")
    weights = options.get("oracle_weights")
    classifier = load_oracle(dataset, Path(weights) if weights else None)
    prefer = parse_classes(options["prefer"], data_mod.class_names(dataset))
    return OracleUser(classifier, prefer, mode=options.get("mode", "binary"),
                      confidence=float(options.get("confidence", 0.9)))
