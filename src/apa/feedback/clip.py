"""The seed's simulated users: OpenCLIP ViT-L-14 (openai) scoring images against a prompt bank.

For an image x and the bank's prompts p_1..p_P, with unit-norm embeddings e(x) and t_j:

    p(j | x) = softmax_j(τ · cos(e(x), t_j)),   τ = ``temperature`` = 10 (the seed's value)

τ multiplies the cosine similarities (as CLIP's own logit scale does, with 100); dividing them
by 10 instead would make every score ≈ 1/P. A user likes one prompt of the bank and scores an
image by its probability; several users form one *union* user scoring max_u p(j_u | x)
(the seed's multi-user rule). The default users are apple, grape and banana.

Weights come from a local file or folder (``clip_weights``) or, offline, from the Hugging Face
cache (the repo open_clip uses for the tag) or open_clip's URL cache (~/.cache/clip); otherwise
:class:`apa.errors.WeightsNotFoundError` names every place searched. open_clip is imported only
inside the functions here, never when apa itself is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from apa.compat import ensure_torchvision
from apa.errors import WeightsNotFoundError
from apa.feedback.base import FeedbackSource
from apa.feedback.images import as_rgb, normalize, resize_center_crop
from apa.feedback.shares import first_match, preference_report
from apa.registry import FEEDBACK

# The default bank: the three default users' fruits, other fruits (the near misses a user must
# tell apart), unrelated objects and scenes, and a prompt for what is not a photo at all, so
# that noise and smears are not credited to any user.
DEFAULT_PROMPTS: dict[str, str] = {
    "apple": "a photo of an apple",
    "grape": "a photo of a grape",
    "banana": "a photo of a banana",
    "orange": "a photo of an orange",
    "strawberry": "a photo of a strawberry",
    "pear": "a photo of a pear",
    "lemon": "a photo of a lemon",
    "cherry": "a photo of a cherry",
    "pineapple": "a photo of a pineapple",
    "watermelon": "a photo of a watermelon",
    "car": "a photo of a car",
    "dog": "a photo of a dog",
    "cat": "a photo of a cat",
    "flower": "a photo of a flower",
    "house": "a photo of a house",
    "person": "a photo of a person",
    "landscape": "a photo of a landscape",
    "noise": "a blurry image of random noise",
}
DEFAULT_USERS = ("apple", "grape", "banana")
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                    "pytorch_model.bin")


@dataclass(frozen=True)
class ClipOptions:
    """Options of the ``clip`` feedback (the seed's defaults)."""

    users: tuple[str, ...] = DEFAULT_USERS  # bank keys, or new names (added as "a photo of a <name>")
    clip_model: str = "ViT-L-14"  # an open_clip model name, or a path to an open_clip JSON config
    clip_pretrained: str = "openai"  # the open_clip tag: where the cache is searched, QuickGELU or not
    clip_weights: str | None = None  # a checkpoint file or a folder holding one; None: the caches
    temperature: float = 10.0  # τ: logits = τ·cos
    prompts: tuple[tuple[str, str], ...] = tuple(DEFAULT_PROMPTS.items())  # (name, prompt) pairs
    reject: tuple[str, ...] = ("noise",)  # bank names whose top rank marks an image as not confident (reports)
    device: str | None = None  # None: cuda if available
    batch_size: int = 8

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ClipOptions":
        """From the feedback options (``config.FeedbackConfig`` as a dict): users may be a comma string,
        prompts a dict, a list or "a=..;b=..". None means "the default"; other sources' keys are ignored."""
        valid = {f.name for f in fields(cls)}
        kw = {k: v for k, v in (options or {}).items() if v is not None and k in valid}
        if "users" in kw:
            kw["users"] = parse_users(kw["users"])
        if "prompts" in kw:
            kw["prompts"] = parse_prompts(kw["prompts"])
        return cls(**kw)


def parse_users(users: str | Sequence[str]) -> tuple[str, ...]:
    """"apple, grape" or ["apple", "grape"] -> ("apple", "grape")."""
    items = users.split(",") if isinstance(users, str) else list(users)
    out = tuple(str(u).strip() for u in items if str(u).strip())
    if not out:
        raise ValueError("the clip feedback needs at least one user, e.g. users=apple,grape,banana")
    return out


def parse_prompts(prompts: Any) -> tuple[tuple[str, str], ...]:
    """A bank from {name: prompt}, [(name, prompt)], ["prompt", ...] (name = prompt) or "name=prompt;..."."""
    if isinstance(prompts, str):
        prompts = [p.split("=", 1) if "=" in p else (p, p) for p in prompts.split(";") if p.strip()]
    items = prompts.items() if isinstance(prompts, dict) else prompts
    bank = tuple((str(n).strip(), str(p).strip()) for n, p in ((i, i) if isinstance(i, str) else i for i in items))
    if len(bank) < 2:
        raise ValueError("a prompt bank needs at least two prompts (the softmax of one prompt is always 1)")
    return bank


def user_prompt(name: str) -> str:
    """The prompt a user outside the bank gets: "a photo of a(n) <name>"."""
    return f"a photo of {'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def build_bank(users: Sequence[str], prompts: Sequence[tuple[str, str]]) -> tuple[list[str], list[str], list[int]]:
    """(names, prompts, index of each user's prompt). A user is a bank name or prompt; others are appended."""
    names, texts = [n for n, _ in prompts], [p for _, p in prompts]
    index = []
    for u in users:
        if u in names:
            index.append(names.index(u))
        elif u in texts:
            index.append(texts.index(u))
        else:
            names.append(u)
            texts.append(user_prompt(u))
            index.append(len(texts) - 1)
    return names, texts, index


# ---------------------------------------------------------------- finding and loading weights


def _checkpoint_in(folder: Path) -> Path | None:
    return next((folder / n for n in CHECKPOINT_NAMES if (folder / n).is_file()), None)


def _cached_hf_checkpoint(repo_id: str) -> tuple[Path, Path | None]:
    """(the repo's HF cache folder, a checkpoint in one of its snapshots or None); no network."""
    # the clip extra: loaded only for --feedback clip
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.strip('/').replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    found = (_checkpoint_in(s) for s in sorted(snapshots.iterdir())) if snapshots.is_dir() else iter(())
    return repo_dir, next((c for c in found if c is not None), None)


def find_clip_weights(model: str, tag: str, weights: str | None) -> Path:
    """The checkpoint to load, or WeightsNotFoundError naming every path looked at."""
    # the clip extra: loaded only for --feedback clip
    from open_clip import get_pretrained_cfg

    looked: list[str] = []
    if weights is not None:
        path = Path(weights).expanduser()
        found = path if path.is_file() else (_checkpoint_in(path) if path.is_dir() else None)
        if found is not None:
            return found
        looked.append(f"{path.resolve()} (--clip-weights: " + ("no checkpoint inside" if path.is_dir()
                                                                 else "does not exist") + ")")
    else:
        cfg = get_pretrained_cfg(model, tag)
        if cfg.get("hf_hub"):
            repo_dir, found = _cached_hf_checkpoint(cfg["hf_hub"])
            if found is not None:
                return found
            looked.append(f"{repo_dir} (Hugging Face cache for {cfg['hf_hub'].strip('/')})")
        if cfg.get("url"):
            url_file = Path("~/.cache/clip").expanduser() / cfg["url"].rsplit("/", 1)[-1]
            if url_file.is_file():
                return url_file
            looked.append(f"{url_file} (open_clip's download cache)")
    raise WeightsNotFoundError(f"OpenCLIP {model} ({tag})", looked, _how_to_get_clip(model, tag))


def _how_to_get_clip(model: str, tag: str) -> str:
    # the clip extra: loaded only for --feedback clip
    from open_clip import get_pretrained_cfg

    repo = get_pretrained_cfg(model, tag).get("hf_hub", "").strip("/") or "<the open_clip repo of the model>"
    return ("Provide the weights in one of two ways:\n"
            "  * point apa at a checkpoint file (or a folder holding open_clip_model.safetensors):\n"
            "      apa align --feedback clip --clip-weights /path/to/open_clip_model.safetensors ...\n"
            "  * or fill the Hugging Face cache on a machine with internet access and copy it here:\n"
            f"      huggingface-cli download {repo}   (HF_HUB_CACHE / HF_HOME select the cache)")


def resolve_model_name(clip_model: str) -> str:
    """An open_clip model name; a path to a JSON config is registered with open_clip under its stem."""
    # the clip extra: loaded only for --feedback clip
    import open_clip

    path = Path(clip_model).expanduser()
    if clip_model.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path} does not exist; pass an open_clip model "
                                    "name (e.g. ViT-L-14) or a path to a JSON config")
        open_clip.add_model_config(path)
        return path.stem
    return clip_model


def load_clip(options: "ClipOptions") -> tuple[torch.nn.Module, Any]:
    """(the frozen open_clip model on its device, its tokenizer); fp16 on CUDA, fp32 on CPU."""
    ensure_torchvision()
    # the clip extra: loaded only for --feedback clip
    import open_clip

    name = resolve_model_name(options.clip_model)
    checkpoint = find_clip_weights(name, options.clip_pretrained, options.clip_weights)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick_gelu = bool(open_clip.get_pretrained_cfg(name, options.clip_pretrained).get("quick_gelu", False))
    model = open_clip.create_model(name, pretrained=str(checkpoint), force_quick_gelu=quick_gelu,
                                   precision="fp16" if device.type == "cuda" else "fp32", device=device)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


# ---------------------------------------------------------------- the users


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP's preprocessing on tensors: shorter side to ``size`` (bicubic), centre crop, normalise.
    images [k, 1 or 3, H, W] in [0, 1] -> [k, 3, size, size]."""
    return normalize(resize_center_crop(as_rgb(images), size, "bicubic"), mean, std)


def prompt_probabilities(image_features: torch.Tensor, text_features: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """p(j | x) = softmax_j(τ·cos(e(x), t_j)). image [k, D], text [P, D] -> [k, P] (float32)."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    return torch.softmax(temperature * img @ txt.T, dim=-1)


def union_scores(probs: torch.Tensor, user_index: Sequence[int]) -> torch.Tensor:
    """The union user's score max_u p(j_u | x). probs [k, P] -> [k]."""
    return probs[:, list(user_index)].max(dim=1).values


class ClipPromptUser(FeedbackSource):
    """One or several simulated users judging images with CLIP. ``__call__``: images [k, 3, H, W] in [0, 1] -> [k]."""

    scale = (0.0, 1.0)  # the range of the scores (probabilities)

    def __init__(self, model: torch.nn.Module, tokenizer: Any, options: ClipOptions = ClipOptions()):
        self.model, self.options = model, options
        self.users = options.users
        self.names, self.prompts, self.user_index = build_bank(options.users, options.prompts)
        self.temperature = float(options.temperature)
        self.name = f"clip[{','.join(self.users)}]"
        self.device = next(model.parameters()).device
        # the clip extra: loaded only for --feedback clip
        from open_clip import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self._size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._mean, self._std = cfg.get("mean"), cfg.get("std")
        with torch.no_grad():
            self.text_features = model.encode_text(tokenizer(self.prompts).to(self.device)).float()  # [P, D]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """p(j | x) over the bank: images [k, 3, H, W] in [0, 1] -> [k, P] float32 on the CPU."""
        dtype = next(self.model.parameters()).dtype
        out = []
        with torch.no_grad():
            for chunk in images.split(self.options.batch_size):
                x = preprocess(chunk.to(self.device).float(), self._size, self._mean, self._std)
                out.append(prompt_probabilities(self.model.encode_image(x.to(dtype)), self.text_features,
                                                self.temperature).cpu())
        return torch.cat(out)

    def user_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Each user's score p(j_u | x): [k, 3, H, W] -> [k, U]."""
        return self.probabilities(images)[:, self.user_index]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The union score max_u p(j_u | x): [k, 3, H, W] in [0, 1] -> [k] float32 (CPU)."""
        return union_scores(self.probabilities(images), self.user_index)

    def evaluate(self, images: torch.Tensor) -> dict:
        """Report on samples [k, 3, H, W]: an image is *preferred* when its top prompt is a user's and
        *confident* when its top prompt is not a rejection prompt (``reject``, default the noise prompt);
        plus each user's mean score and the histogram of top prompts."""
        probs = self.probabilities(images)
        top = probs.argmax(dim=1)
        reject = [i for i, n in enumerate(self.names) if n in self.options.reject]
        confident = ~torch.isin(top, torch.as_tensor(reject, dtype=top.dtype))
        report = preference_report(first_match(top, [[j] for j in self.user_index]), confident, self.users,
                                   union_scores(probs, self.user_index))
        report["user_mean_scores"] = {u: float(probs[:, j].mean()) if len(top) else 0.0
                                      for u, j in zip(self.users, self.user_index)}
        report["class_histogram"] = {n: int((top == j).sum()) for j, n in enumerate(self.names) if (top == j).any()}
        return report


def load_clip_user(options: ClipOptions = ClipOptions()) -> ClipPromptUser:
    model, tokenizer = load_clip(options)
    return ClipPromptUser(model, tokenizer, options)


@FEEDBACK.register("clip")
def make_clip(options: dict, prior=None) -> ClipPromptUser:
    """The ``--feedback clip`` factory. Options: users (list or "apple,grape"), clip_model,
    clip_pretrained, clip_weights, temperature, prompts, device (see :class:`ClipOptions`)."""
    return load_clip_user(ClipOptions.from_dict(options))
