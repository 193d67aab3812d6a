"""The judge: a second classifier that rates nothing and only scores final batches from outside.

The simulated user's oracle (``apa.feedback.classifier``) both rates the images a session shows and,
until now, judged the batch the session ends with. The judge is independent of it on three counts:

- another architecture: a residual CNN with GroupNorm, SiLU, strided convolutions, global average
  pooling and dropout (the oracle: plain conv + ReLU + max-pool, a dense hidden layer, no norm);
- another data split: a seeded reshuffle of the dataset's train and test images together, with the
  judge's own held-out images (``apa.training.judge.judge_split``);
- an explicit 11th output, "none of the classes" (index :data:`NONE`), trained on real images of the
  other dataset (Fashion-MNIST for the MNIST judge, MNIST for the Fashion judge) and on synthetic
  off-data (noise, blobs, blanks, two-class blends, real images under strong noise), where the
  oracle only learns a flat target.

``apa train-judge`` trains it (``apa.training.judge``); the shipped files are
``apa/weights/judge_<dataset>.safetensors`` with model cards ``judge_<dataset>.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from apa.shipped import export_network, network_metadata, shipped_path

NUM_CLASSES = 10
NONE = NUM_CLASSES  # the label of "none of the classes" (not a digit / not a garment)
CONFIDENCE = 0.9  # the bar a prediction must reach to count as confident, as for the oracle


@dataclass(frozen=True)
class JudgeConfig:
    channels: tuple[int, int, int] = (16, 32, 64)  # widths at 28x28, 14x14, 7x7
    groups: int = 8  # GroupNorm groups in every norm layer
    dropout: float = 0.2  # on the pooled features before the linear head (training only)
    num_outputs: int = NUM_CLASSES + 1  # the classes, then NONE
    temperature: float = 1.0  # the logits are divided by it; fitted on calibration images after training

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeConfig":
        return cls(**{**d, "channels": tuple(d["channels"])})


class ResidualBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), pre-activation, same width and size. [N, c, h, w] -> same."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class JudgeNet(nn.Module):
    """Images [N, 1, 28, 28] in [0, 1] -> logits [N, 11] (10 classes, then NONE), divided by the temperature.

    Stem conv at 28x28, a residual block per resolution (28, 14, 7) joined by stride-2 convolutions,
    GroupNorm + SiLU, global average pooling, dropout, one linear layer.
    """

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        g = config.groups
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), ResidualBlock(c1, g),
            nn.GroupNorm(g, c1), nn.SiLU(), nn.Conv2d(c1, c2, 3, stride=2, padding=1), ResidualBlock(c2, g),
            nn.GroupNorm(g, c2), nn.SiLU(), nn.Conv2d(c2, c3, 3, stride=2, padding=1), ResidualBlock(c3, g),
            nn.GroupNorm(g, c3), nn.SiLU())
        self.head = nn.Linear(c3, config.num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled activations the head reads. [N, 1, 28, 28] in [0, 1] -> [N, c3]."""
        return self.body(x - 0.5).mean(dim=(2, 3))  # global average pool

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, 1, 28, 28] in [0, 1] -> logits [N, 11].

        In training mode the features pass through dropout, its mask drawn on the CPU with
        ``generator`` (the training loop's, so a resumed run drops the same units as a straight one).
        """
        h = self.features(x)
        if self.training and self.config.dropout > 0:
            keep = 1.0 - self.config.dropout
            mask = (torch.rand(h.shape, generator=generator) < keep).to(h.device, h.dtype) / keep
            h = h * mask
        return self.head(h) / self.config.temperature


def _shares(mask: torch.Tensor) -> float:
    return round(float(mask.float().mean()), 4) if mask.numel() else 0.0


class Judge:
    """A trained :class:`JudgeNet` in eval mode and the confidence bar its verdicts use."""

    def __init__(self, model: JudgeNet, dataset: str, confidence: float = CONFIDENCE):
        self.model, self.dataset, self.confidence = model.eval().requires_grad_(False), dataset, confidence

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Softmax over the 11 outputs. images [n, 1, 28, 28] in [0, 1] -> [n, 11] (float32, CPU)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
            raise ValueError(f"the judge takes images [n, 1, 28, 28] in [0, 1], not {tuple(images.shape)}")
        device = next(self.model.parameters()).device
        out = [F.softmax(self.model(x.to(device, torch.float32)).float(), dim=1).cpu() for x in images.split(chunk)]
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_outputs)

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top output and its probability. images [n, 1, 28, 28] in [0, 1] ->
        (labels [n] int64, 0..9 a class, 10 = NONE "none of the classes"; confidence [n] float32)."""
        confidence, labels = self.probabilities(images).max(dim=1)
        return labels, confidence

    def evaluate(self, images: torch.Tensor, prefer: Sequence[int]) -> dict:
        """What the judge says of a batch [n, 1, 28, 28] for a user who prefers the classes ``prefer``.

        - preferred_confident_share: top output in ``prefer`` with probability >= the bar (0.9);
        - preferred_share: top output in ``prefer``, any probability;
        - confident_share: top output a class (not NONE) with probability >= the bar;
        - none_share: top output NONE, any probability;
        - class_shares_preferred: each preferred class's share among the preferred-and-confident
          images (all 0 when there are none); min_class_share: the smallest of them (0 if none);
        - class_shares: the share of each of the 11 top outputs (index 10 = NONE).
        """
        prefer = tuple(sorted({int(c) for c in prefer}))
        if not prefer or not all(0 <= c < NUM_CLASSES for c in prefer):
            raise ValueError(f"prefer must name classes in 0..{NUM_CLASSES - 1}, not {prefer}")
        labels, conf = self.classify(images)
        preferred = torch.isin(labels, torch.tensor(prefer))
        good = preferred & (conf >= self.confidence)
        counts = torch.bincount(labels[good], minlength=NUM_CLASSES)
        per_class = {c: round(float(counts[c]) / int(good.sum()), 4) if good.any() else 0.0 for c in prefer}
        return {"n": len(labels), "prefer": list(prefer), "confidence": self.confidence,
                "preferred_confident_share": _shares(good), "preferred_share": _shares(preferred),
                "confident_share": _shares((labels != NONE) & (conf >= self.confidence)),
                "none_share": _shares(labels == NONE),
                "class_shares_preferred": per_class, "min_class_share": min(per_class.values()),
                "class_shares": [_shares(labels == c) for c in range(NUM_CLASSES + 1)]}


# ---------------------------------------------------------------- shipping and loading


def weights_path(dataset: str) -> Path:
    """Where the shipped judge of a dataset lives: ``apa/weights/judge_<dataset>.safetensors``."""
    return shipped_path(f"judge_{dataset}.safetensors")


def export_judge(model: JudgeNet, path: Path, dataset: str, info: dict) -> Path:
    """Write a judge's weights as safetensors (metadata: judge config, dataset, training info)."""
    return export_network(model, path, "judge", model.config.to_dict(), dataset, info)


def judge_metadata(dataset: str = "mnist", path: Path | None = None) -> dict:
    """The metadata of a shipped (or given) judge file: judge config, dataset, info (decoded)."""
    return network_metadata(Path(path) if path is not None else weights_path(dataset), "judge")


def load_judge(dataset: str = "mnist", path: Path | None = None, confidence: float = CONFIDENCE) -> Judge:
    """The shipped (or a given) judge of ``dataset``, on the CPU, in eval mode.

    Raises FileNotFoundError naming the path it looked at and how to make the file.
    """
    path = Path(path) if path is not None else weights_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no judge weights at {path}; train them with `apa train-judge --dataset {dataset}`")
    meta = judge_metadata(dataset, path)
    model = JudgeNet(JudgeConfig.from_dict(meta["judge"]))
    model.load_state_dict(load_file(str(path)))
    return Judge(model, meta["dataset"], confidence)
