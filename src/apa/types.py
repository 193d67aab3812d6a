"""Shape aliases used in docstrings and signatures. The particle dimension is always first."""

from __future__ import annotations

from typing import TypeAlias

import torch

Particles: TypeAlias = torch.Tensor  # [N, *event_shape]
LogWeights: TypeAlias = torch.Tensor  # [N], unnormalised or normalised log-weights
Indices: TypeAlias = torch.Tensor  # [M] int64 ancestor indices into the N particles
