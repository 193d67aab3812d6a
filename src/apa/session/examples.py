"""A session started from images the user already likes: the first round holds them, each rated liked.

A person who knows what they want can show it instead of waiting for the rounds to find it, which
at a taste of 2% of the prior takes about 35 plain ratings on average. The given images are rated
at the top of the user's scale and count in the budget; the rounds after them search around them
(and away from what the user dislikes), and a final image near one of them is a near-copy, not a
new image, in every measure of what a person takes home.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from apa import data
from apa.feedback.images import resize_center_crop
from apa.measures.novelty import users_liked
from apa.seeding import generator
from apa.smc.weights import uniform

MAX_GIVEN_PIXELS = 16 * 10**6  # a given image decoding to more pixels is refused before it is decoded
GIVEN = "given"  # the source of the ratings of images the user gave, and the key of their round's info


class ExamplesError(ValueError):
    """Examples that cannot start a session (none liked, a prior that cannot take images)."""


def liked_examples(user: Any, dataset: str, n: int, seed: int) -> torch.Tensor:
    """n held-out real images of ``dataset`` ("mnist" | "fashion") that the simulated ``user`` likes,
    in an order its ``seed`` sets: [n, 1, H, W] in [0, 1]. A like-these taste never gets back the
    images that define it."""
    if dataset not in ("mnist", "fashion"):
        raise ExamplesError(f"--examples needs a prior with a real data set (mnist or fashion), not {dataset!r}")
    pool = torch.from_numpy(data.to_unit(data.load(dataset)["test_images"]))
    order = torch.randperm(pool.shape[0], generator=generator(seed, 0, "examples"))
    spec = user.taste.spec if user.taste is not None else None
    if spec is not None and spec.examples:
        order = order[~torch.isin(order, torch.tensor(spec.examples))]
    chosen: list[torch.Tensor] = []
    for block in order.split(512):  # the first n liked ones, in that order
        with torch.no_grad():
            liked = block[users_liked(user, pool[block])]
        chosen.append(liked)
        if sum(c.numel() for c in chosen) >= n:
            break
    idx = torch.cat(chosen)[:n]
    if idx.numel() < n:
        raise ExamplesError(f"the user likes only {idx.numel()} of the held-out {dataset} images; ask for fewer --examples")
    return pool[idx]


def takes_images(prior: Any, fix: str) -> None:
    """ExamplesError (its message ending in ``fix``) unless ``prior`` can encode images into particles."""
    if prior.encode is None:
        raise ExamplesError(f"the {prior.name} prior cannot take given images (it has no encode){fix}")


def read_given(blobs: list[bytes], prior: Any) -> torch.Tensor:
    """Images a person gives (PNG, JPEG or any format Pillow reads, as bytes) as the ``prior``'s images:
    each converted to its channels (grey or RGB), its shorter side scaled to the prior's size and the
    centre cropped: [n, C, H, W] in [0, 1]. One line says which image cannot be read, before anything is
    written."""
    from PIL import Image, UnidentifiedImageError

    takes_images(prior, "; start without them")
    channels, size = int(prior.event_shape[0]), int(prior.event_shape[-1])
    out = []
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:  # reads the header only, until the pixels are asked for
                if im.width * im.height > MAX_GIVEN_PIXELS:
                    raise ExamplesError(f"image {i + 1} of the {len(blobs)} given is {im.width}×{im.height}; give "
                                        f"images of at most {MAX_GIVEN_PIXELS // 10**6} megapixels")
                pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        except ExamplesError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ExamplesError(f"image {i + 1} of the {len(blobs)} given cannot be read as an image; give PNG "
                                "or JPEG files") from e
        x = torch.from_numpy(pixels).reshape(pixels.shape[0], pixels.shape[1], channels).permute(2, 0, 1)
        out.append(resize_center_crop(x[None], size, mode="bilinear"))
    return torch.cat(out)


def examples_round(prior: Any, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored round of given images [n, C, H, W] in [0, 1]: its tensors (particles [n, *event],
    equal log-weights, every one shown) and its info."""
    takes_images(prior, "; drop --examples")
    with torch.no_grad():
        z = prior.encode(images).cpu()
    n = z.shape[0]
    tensors = {"particles": z, "log_weights": uniform(n), "shown": torch.arange(n)}
    info = {GIVEN: n, "ess": [], "resampled": [], "unique_origins": n, "beta_used": False, "explored": 0,
            "calls": 0}
    return tensors, info
