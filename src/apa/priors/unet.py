"""A compact ε-prediction UNet for 1x28x28 images (the built-in DDPM prior's network).

Why our own and not diffusers' ``UNet2DModel``: the default prior must train to quality in
about an hour on two CPU cores and load with no optional dependency. This network keeps the
UNet shape (two downsamplings 28 -> 14 -> 7, a self-attention block at 7x7, skip connections,
GroupNorm + SiLU residual blocks with an additive time embedding) at a fraction of the cost;
see the model card ``apa/weights/README.md`` for the measured comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from apa.priors.calls import counted


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    channels: tuple[int, int, int] = (16, 48, 96)  # widths at 28x28, 14x14, 7x7
    time_dim: int = 128  # width of the time embedding
    groups: int = 8  # GroupNorm groups

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{**d, "channels": tuple(d["channels"])})


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps. t: [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


Segments = "tuple[int, ...] | None"  # row counts of the callers sharing one batched call (None: one caller)


def per_segment(layer: nn.Module, x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``layer`` on x [B, ...], one call per caller's rows. The bits of a matrix product and of a
    GroupNorm depend on how many rows the call holds (their reductions are split by size), so
    these run per caller, which gets exactly the bits of its own call; the convolutions, the
    network's cost, are row by row and run on the whole batch (priors/batching.py)."""
    if segments is None or len(segments) == 1:
        return layer(x)
    return torch.cat([layer(part) for part in x.split(list(segments))])


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, segments: Segments = None) -> torch.Tensor:
        h = self.conv1(F.silu(per_segment(self.norm1, x, segments)))
        h = h + per_segment(self.temb, temb, segments)[:, :, None, None]
        h = self.conv2(F.silu(per_segment(self.norm2, h, segments)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, segments: Segments = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(per_segment(self.norm, x, segments)).reshape(n, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(a.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    """ε_θ(x_t, t): x [N, C, 28, 28], t [N] integer timesteps -> ε [N, C, 28, 28]."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        td, g = config.time_dim, config.groups
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.conv_in = nn.Conv2d(config.in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, td, g)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, td, g)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.down3 = ResBlock(c2, c3, td, g)
        self.mid1 = ResBlock(c3, c3, td, g)
        self.attn = SelfAttention(c3, g)
        self.mid2 = ResBlock(c3, c3, td, g)
        self.up3 = ResBlock(c3 + c3, c3, td, g)
        self.up2 = ResBlock(c3 + c2, c2, td, g)
        self.up1 = ResBlock(c2 + c1, c1, td, g)
        self.norm_out = nn.GroupNorm(g, c1)
        self.conv_out = nn.Conv2d(c1, config.in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor, t: torch.Tensor, segments: Segments = None
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The down path and middle. Returns (mid [N, c3, 7, 7], skips, time embedding)."""
        temb = per_segment(self.time_mlp, timestep_embedding(t, self.config.time_dim), segments)
        h1 = self.down1(self.conv_in(x), temb, segments)
        h2 = self.down2(self.pool1(h1), temb, segments)
        h3 = self.down3(self.pool2(h2), temb, segments)
        mid = self.mid2(self.attn(self.mid1(h3, temb, segments), segments), temb, segments)
        return mid, [h1, h2, h3], temb

    def features(self, x: torch.Tensor, t: torch.Tensor, segments: Segments = None) -> torch.Tensor:
        """Pooled middle-block activations, the surrogate's input. x [N,C,28,28] -> [N, c3]."""
        mid, _, _ = self.encode(x, t, segments)
        return counted("features", mid.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, segments: Segments = None) -> torch.Tensor:
        """``segments``: the row counts of the callers sharing this call (see :func:`per_segment`)."""
        h, (h1, h2, h3), temb = self.encode(x, t, segments)
        h = self.up3(torch.cat([h, h3], 1), temb, segments)
        h = F.interpolate(h, size=h2.shape[-2:], mode="nearest")
        h = self.up2(torch.cat([h, h2], 1), temb, segments)
        h = F.interpolate(h, size=h1.shape[-2:], mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), temb, segments)
        return counted("eps", self.conv_out(F.silu(per_segment(self.norm_out, h, segments))))
