"""Sample-quality and diversity measures over classifier features and class counts.

Plain functions on numpy arrays or torch tensors (rows are samples). Features normally come from
the oracle's penultimate layer (``apa.feedback.classifier.extract_features``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_2d(x: ArrayLike, name: str) -> np.ndarray:
    """A feature matrix as float64 [n, D]; refuses other ranks and non-finite values."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a [n, D] feature matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix [D, D]."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, D] and [m, D].

    FD = |μa − μb|² + tr(Ca) + tr(Cb) − 2·tr((Ca^½ Cb Ca^½)^½), with unbiased covariances; the
    matrix square roots are taken by symmetric eigendecomposition (no complex round-off).
    """
    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(ca)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cb @ root_a), 0.0, None)).sum()
    fd = float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2.0 * cross)
    return max(fd, 0.0)


def mean_pairwise_distance(feats: ArrayLike) -> float:
    """Mean Euclidean distance over all pairs i < j of the rows of feats [n, D] (n >= 2)."""
    a = _as_2d(feats, "feats")
    n = len(a)
    if n < 2:
        raise ValueError(f"need at least 2 samples for a pairwise distance, got {n}")
    sq = np.sum(a**2, axis=1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0, None)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


def coverage_entropy(class_counts: Sequence[int] | ArrayLike, classes: Sequence[int]) -> float:
    """Normalised entropy in [0, 1] of the counts restricted to ``classes``.

    1 when the samples spread evenly over the given classes, 0 when they all fall in one (or
    there are none). With a single class: 1 if it has any sample, else 0.
    """
    counts = np.asarray(class_counts.detach().cpu() if isinstance(class_counts, torch.Tensor) else class_counts,
                        dtype=np.float64).reshape(-1)
    classes = sorted(set(int(c) for c in classes))
    if not classes:
        raise ValueError("coverage_entropy needs at least one class")
    if min(classes) < 0 or max(classes) >= len(counts):
        raise ValueError(f"classes {classes} out of range for {len(counts)} counts")
    sub = counts[classes]
    total = sub.sum()
    if total <= 0:
        return 0.0
    if len(classes) == 1:
        return 1.0
    p = sub[sub > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(len(classes)))


NEAR_COPY_QUANTILE = 0.05  # independent prior samples are near-copies this often, by construction


def nearest_distance(images: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Pixel L2 distance from each image [n, ...] to its nearest reference image [m, ...] -> [n]."""
    if reference.shape[0] == 0:
        raise ValueError("no reference images to measure a distance to")
    ref = reference.reshape(reference.shape[0], -1).double()
    flat = images.reshape(images.shape[0], -1).double()
    return torch.cat([torch.cdist(part, ref).min(dim=1).values for part in flat.split(chunk)]) if len(flat) else \
        torch.zeros(0, dtype=torch.float64)
