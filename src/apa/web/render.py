"""PNG bytes for the page: one shown image, a round's grid, the final samples."""

from __future__ import annotations

import io

import torch
from PIL import Image

from apa.evaluation.images import grid

TARGET_SIDE = 168  # small images (MNIST's 28 px) are enlarged, nearest neighbour, to about this many pixels


def png(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> bytes:
    """images [n, C, H, W] in [0, 1] -> a PNG of their grid, small images enlarged so pixels stay sharp."""
    img = Image.fromarray(grid(images, nrow, pad))
    side = images.shape[-1]
    scale = max(1, TARGET_SIDE // side) if side < TARGET_SIDE else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def single_png(image: torch.Tensor) -> bytes:
    """One image [C, H, W] in [0, 1] -> PNG bytes, no border."""
    return png(image.unsqueeze(0), nrow=1, pad=0)
