"""The oracle classifier: a compact CNN on the dataset's images, with its calibration, loading and export.

It is trained by ``apa.training.oracle`` (the recipe) and turned into a simulated user by
``apa.feedback.oracle``. Its measured behaviour is recorded in the model cards
``apa/weights/oracle_<dataset>.md`` and in the weights' metadata.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from apa.shipped import export_network, network_metadata, shipped_path

NUM_CLASSES = 10


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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling: the T in [0.2, 5] minimising the mean NLL of softmax(logits / T).

    logits [n, C] (at T = 1), labels [n]. A grid of 801 points evenly spaced in log T (steps of 0.4%).
    """
    temps = torch.exp(torch.linspace(math.log(0.2), math.log(5.0), 801, dtype=torch.float64))
    lg = logits.double()
    nll = torch.stack([F.cross_entropy(lg / t, labels) for t in temps])
    return float(temps[int(nll.argmin())])


def weights_path(dataset: str) -> Path:
    """Where the shipped oracle of a dataset lives: ``apa/weights/oracle_<dataset>.safetensors``."""
    return shipped_path(f"oracle_{dataset}.safetensors")


def export_oracle(model: Classifier, path: Path, dataset: str, info: dict) -> Path:
    """Write an oracle's weights as safetensors (metadata: classifier config, dataset, training info)."""
    return export_network(model, path, "classifier", model.config.to_dict(), dataset, info)


def oracle_metadata(dataset: str = "mnist", path: Path | None = None) -> dict:
    """The metadata of a shipped (or given) oracle file: classifier config, dataset, info (decoded)."""
    return network_metadata(Path(path) if path is not None else weights_path(dataset), "classifier")


def load_oracle(dataset: str = "mnist", path: Path | None = None) -> Classifier:
    """The shipped (or a given) oracle classifier in eval mode, gradients off.

    Raises FileNotFoundError naming the path it looked at and how to make the file.
    """
    path = Path(path) if path is not None else weights_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no oracle weights at {path}; train them with `apa train-oracle --dataset {dataset}` "
                                "or pass the oracle_weights option")
    try:
        meta = oracle_metadata(dataset, path)
        model = Classifier(ClassifierConfig.from_dict(meta["classifier"]))
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not an oracle's weights file ({type(e).__name__}: {e}); pass --oracle-weights "
                         "a safetensors file written by `apa train-oracle`, or drop it for the shipped one") from e
    return model.eval().requires_grad_(False)


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
