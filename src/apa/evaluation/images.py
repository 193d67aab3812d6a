"""Image grids as PNG files a person can open."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """images [n, C, H, W] in [0, 1] -> uint8 [rows·(H+pad)+pad, nrow·(W+pad)+pad, 3]."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    x = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    x = np.repeat(x, 3, axis=1) if c == 1 else x[:, :3]
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i].transpose(1, 2, 0)
    return out


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Write a grid PNG (upscaled ``scale`` times, nearest neighbour, for small images)."""
    img = Image.fromarray(grid(images, nrow))
    if scale > 1 and images.shape[-1] < 128:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)
