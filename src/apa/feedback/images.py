"""Image preprocessing on tensors shared by the classifier-backed users (CLIP, ImageNet)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F


def resize_center_crop(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Shorter side to ``size`` (antialiased), then the central size x size window.

    images [k, C, H, W] in [0, 1] -> [k, C, size, size] in [0, 1].
    """
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = F.interpolate(images.float(), size=new_hw, mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return x[..., top:top + size, left:left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean)/std per channel. images [k, C, H, W]."""
    m = torch.tensor(list(mean), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images [k, 1, H, W] repeated to 3 channels; RGB passes through. -> [k, 3, H, W]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [k, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
