"""Tastes no class names: a simulated user who likes a style within a class, or images like a few examples.

A class set ("1,4,7,9") is the easy taste: every liked image is a whole class, 10–40% of the prior.
A person's taste is more often narrow and nameless. Two kinds, each set so it holds ``share`` (1–5%)
of the prior's own samples:

- ``style:CLASS:MEASURE``: a confident CLASS whose pixel measure lies in the top of that class's
  prior samples. MEASURE is one of :data:`MEASURES`: ``thick``/``thin`` (ink mass), ``slant-right``/
  ``slant-left`` (the ink's shear, x against y), ``large``/``small`` (the ink's spread);
- ``like:I,J,...``: images whose features lie as close to one of the held-out real images I, J, ...
  (indices into the dataset's held-out split) as the closest ``share`` of the prior's samples.

A taste is fitted to a *view*: a classifier's class probabilities and features. The simulated user
sees through the oracle; the independent judge scores the same taste through its own network
(``Taste.fit(spec, judge_view, pool)``), so a batch cannot please the judge by copying the oracle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save

from apa import data
from apa.atomic import write_file
from apa.data import data_dir
from apa.feedback.base import FeedbackSource
from apa.feedback.classifier import extract_features, parse_classes
from apa.smc.sampler import sample_prior

MEASURES = ("thick", "thin", "slant-right", "slant-left", "large", "small")
KINDS = ("style", "like")
POOL_STEPS = 25  # the prior's samples that set a taste's threshold are drawn at the default step count


@dataclass(frozen=True)
class TasteSpec:
    """A taste as written: ``style:7:thick`` or ``like:3,17,42``, and the share of the prior it holds."""

    kind: str
    cls: int | None = None  # style: the class
    measure: str | None = None  # style: one of MEASURES
    examples: tuple[int, ...] = ()  # like: indices into the held-out split
    share: float = 0.02

    @property
    def label(self) -> str:
        body = f"{self.cls}:{self.measure}" if self.kind == "style" else ",".join(map(str, self.examples))
        return f"{self.kind}:{body}@{self.share:g}"


def parse_taste(text: str, share: float = 0.02, names: Sequence[str] = ()) -> TasteSpec:
    """"style:7:thick" | "style:sneaker:thin" | "like:3,17,42" -> TasteSpec; ValueError saying the form."""
    form = "--taste must be style:CLASS:MEASURE (MEASURE one of " + ", ".join(MEASURES) + ") or like:I,J,... " \
           f"(held-out image indices), got {text!r}"
    if not 0.0 < share < 0.5:
        raise ValueError(f"--taste-share must be a share of the prior in (0, 0.5), got {share!r}")
    kind, _, rest = str(text).partition(":")
    if kind == "style":
        cls, _, measure = rest.partition(":")
        if measure not in MEASURES or not cls:
            raise ValueError(form)
        (c,) = parse_classes(cls, names)
        return TasteSpec("style", cls=c, measure=measure, share=float(share))
    if kind == "like":
        items = [p.strip() for p in rest.split(",")]
        if not items or not all(p.isdigit() for p in items) or len(set(items)) != len(items):
            raise ValueError(form)
        return TasteSpec("like", examples=tuple(int(p) for p in items), share=float(share))
    raise ValueError(form)


# ---------------------------------------------------------------- pixel measures


def ink_moments(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ink mass, shear and spread of images [n, 1, H, W] in [0, 1] -> each [n].

    mass = mean intensity; with the ink as a distribution over pixel positions (x right, y up,
    in pixels), slant = cov(x, y) / var(y) (positive: leaning right) and spread = sqrt(var(x) + var(y)).
    """
    n, _, h, w = images.shape
    ink = images.reshape(n, h, w).double()
    total = ink.sum(dim=(1, 2)).clamp_min(1e-9)
    ys = torch.arange(h, dtype=torch.float64).flip(0)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    mx, my = (ink * xs).sum(dim=(1, 2)) / total, (ink * ys).sum(dim=(1, 2)) / total
    dx, dy = xs[None] - mx[:, None, None], ys[None] - my[:, None, None]
    vx, vy = (ink * dx**2).sum(dim=(1, 2)) / total, (ink * dy**2).sum(dim=(1, 2)) / total
    cxy = (ink * dx * dy).sum(dim=(1, 2)) / total
    return {"mass": ink.mean(dim=(1, 2)), "slant": cxy / vy.clamp_min(1e-9), "spread": (vx + vy).sqrt()}


def style_measure(images: torch.Tensor, measure: str) -> torch.Tensor:
    """The measure a style ranks by, larger = more of the style: images [n, 1, H, W] -> [n] float64."""
    m = ink_moments(images)
    base, sign = {"thick": ("mass", 1.0), "thin": ("mass", -1.0), "slant-right": ("slant", 1.0),
                  "slant-left": ("slant", -1.0), "large": ("spread", 1.0), "small": ("spread", -1.0)}[measure]
    return sign * m[base]


# ---------------------------------------------------------------- a taste seen through one view


@dataclass(frozen=True)
class View:
    """How one network sees images [n, 1, 28, 28] in [0, 1]: class probabilities [n, C ≥ 10] (a "none"
    output after the ten classes allowed), features [n, d], and the bar a confident prediction meets."""

    probabilities: Callable[[torch.Tensor], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor]
    confidence: float


class Taste:
    """A taste fitted to a view: ``score(images) -> [n]`` (−inf where the taste cannot hold) and
    ``liked(images) -> bool [n]``, liked where the score reaches the threshold that ``share`` of
    the prior's samples reach."""

    def __init__(self, spec: TasteSpec, view: View, threshold: float, examples: torch.Tensor | None = None):
        self.spec, self.view, self.threshold = spec, view, float(threshold)
        self.examples = examples  # like: the example images [k, 1, 28, 28]
        self._anchors = None if examples is None else _unit(view.features(examples))

    @classmethod
    def fit(cls, spec: TasteSpec, view: View, pool: torch.Tensor, examples: torch.Tensor | None = None) -> "Taste":
        """The taste with its threshold set on ``pool``, prior images [M, 1, 28, 28]: the score of the
        ⌈share·M⌉-th best (every eligible image when fewer are eligible)."""
        taste = cls(spec, view, float("-inf"), examples)
        scores = taste.score(pool)
        k = max(1, round(spec.share * pool.shape[0]))
        finite = scores[torch.isfinite(scores)]
        taste.threshold = float(finite.topk(min(k, finite.numel())).values[-1]) if finite.numel() else float("inf")
        return taste

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """How much of the taste each image [n, 1, 28, 28] has: [n] float64, −inf where it cannot hold."""
        if self.spec.kind == "like":
            return (_unit(self.view.features(images)) @ self._anchors.T).max(dim=1).values.double()
        top, pred = self.view.probabilities(images).max(dim=1)
        eligible = (pred == self.spec.cls) & (top >= self.view.confidence)
        return torch.where(eligible, style_measure(images, self.spec.measure), torch.tensor(float("-inf"),
                                                                                          dtype=torch.float64))

    def liked(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 1, 28, 28] -> bool [n]."""
        return self.score(images) >= self.threshold if images.shape[0] else torch.zeros(0, dtype=torch.bool)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=1)


# ---------------------------------------------------------------- the pool and the examples


def prior_key(prior) -> str:
    """A digest of a prior's network parameters (its identity for caching samples of it)."""
    h = hashlib.sha256()
    for name, t in sorted(prior.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def prior_pool(prior, n: int) -> torch.Tensor:
    """n plain samples of ``prior`` at POOL_STEPS steps, decoded [n, C, H, W]: drawn once per machine
    (seed 1) and cached beside the prior-only baselines; a damaged cache entry is drawn again."""
    path = data_dir() / "baselines" / f"pool_{prior_key(prior)}_{POOL_STEPS}_{n}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["images"]
        except Exception:  # noqa: BLE001 - a damaged cache is drawn again
            pass
    with torch.no_grad():
        images = sample_prior(prior, n, POOL_STEPS, torch.Generator().manual_seed(1), batch_size=256).cpu()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, save({"images": images.contiguous()}), mode=0o644, shared=True)
    except OSError:
        pass  # no cache: drawn again next time
    return images


def example_images(dataset: str, indices: Sequence[int]) -> torch.Tensor:
    """Held-out real images of a dataset by index: [k, 1, 28, 28] in [0, 1]."""
    x = data.load(dataset)["test_images"]
    bad = [i for i in indices if not 0 <= i < len(x)]
    if bad:
        raise ValueError(f"--taste like: indices {bad} are outside the held-out split (0..{len(x) - 1})")
    return torch.from_numpy(data.to_unit(x[list(indices)]))


# ---------------------------------------------------------------- the simulated user


class TasteUser(FeedbackSource):
    """A simulated user with a taste no class names, seen through the oracle classifier.

    ``__call__(images [k, 1, 28, 28]) -> scores [k]``: +1 where the taste holds, else −1. ``prefer`` is
    the taste's class (style) or the oracle's classes of the examples (like): what class-based
    measures (near-copies' yardstick) read; ``evaluate`` reports the taste's share as the preferred share.
    """

    def __init__(self, oracle, taste: Taste, prior_share: float):
        self.oracle, self.taste, self.prior_share = oracle, taste, float(prior_share)
        self.classifier, self.confidence = oracle.classifier, oracle.confidence
        self.name = f"taste[{taste.spec.label}]"
        self.prefer = (taste.spec.cls,) if taste.spec.kind == "style" else tuple(sorted(set(
            int(c) for c in oracle.probabilities(taste.examples).argmax(dim=1).tolist())))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The oracle's class probabilities [k, 10]."""
        return self.oracle.probabilities(images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, 1, 28, 28] in [0, 1] -> scores [k] float32 (+1 liked, −1 not)."""
        return (self.taste.liked(images).float() * 2.0 - 1.0).to(images.device)

    def evaluate(self, images: torch.Tensor) -> dict:
        """The oracle's report of a batch, with the taste's share as the preferred-and-confident share."""
        report = self.oracle.evaluate(images)
        share = float(self.taste.liked(images).double().mean()) if images.shape[0] else 0.0
        return {**report, "taste": self.taste.spec.label, "taste_prior_share": self.prior_share,
                "preferred_share": share, "preferred_confident_share": share,
                "preferred_class_shares": {c: 1.0 / len(self.prefer) for c in self.prefer} if share else
                {c: 0.0 for c in self.prefer}}


def oracle_view(oracle) -> View:
    """The simulated user's view: the oracle classifier's probabilities and penultimate features."""
    return View(oracle.probabilities, lambda x: extract_features(oracle.classifier, x), oracle.confidence)


def judge_view(judge) -> View:
    """The independent judge's view: its probabilities (a "none" output last) and pooled features."""
    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([judge.model.features(part) for part in x.split(1024)]) if x.shape[0] else \
            torch.zeros(0, judge.model.head.in_features)

    return View(judge.probabilities, features, judge.confidence)


def taste_user(oracle, spec: TasteSpec, prior, dataset: str, pool_size: int) -> TasteUser:
    """The simulated user of a taste: fitted to the oracle's view on ``pool_size`` prior samples."""
    pool = prior_pool(prior, pool_size)
    examples = example_images(dataset, spec.examples) if spec.kind == "like" else None
    taste = Taste.fit(spec, oracle_view(oracle), pool, examples)
    return TasteUser(oracle, taste, float(taste.liked(pool).double().mean()))
