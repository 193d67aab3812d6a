"""What a person takes home from a batch: distinct, new images they like ("yield"). Plain functions on tensors.

- *Distinct*: an image repeats another of the batch when their pixel L2 distance is below the
  duplicate threshold: the ``DUPLICATE_QUANTILE`` quantile of the nearest-neighbour distance among
  ``YARDSTICK`` independent prior samples of the liked kind (each to the nearest of the others). Independent
  samples of what the person likes are repeats of one another only that often; an exact copy
  (a particle resampled twice) always is. The distinct images are chosen greedily in batch order.
- *New*: not a near-copy of any rated image (``novelty.near_copies``' threshold against the rated
  images, with the same prior samples as the yardstick).
- *Liked*: what the evaluator (the simulated user's oracle, or the independent judge) likes.

yield = the number of images of the batch that are liked, new and distinct from one another; it
is reported per batch, per 1,000 network-call rows (``apa.priors.calls``) and per second.
"""

from __future__ import annotations

import torch

from apa.measures.metrics import NEAR_COPY_QUANTILE, nearest_distance

DUPLICATE_QUANTILE = 0.01  # independent prior samples of the liked kind repeat one another this often
YARDSTICK = 256  # ... among this many of them (a final batch's size): more samples lie closer together


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def duplicate_threshold(prior_liked: torch.Tensor, quantile: float = DUPLICATE_QUANTILE) -> float:
    """The pixel distance below which two images are one image: the ``quantile`` of the nearest-other
    distance among independent prior samples of the liked kind [p, ...], the first YARDSTICK of them
    (0 with fewer than 2)."""
    if prior_liked.shape[0] < 2:
        return 0.0
    x = _flat(prior_liked[:YARDSTICK])
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float(torch.quantile(d.min(dim=1).values, quantile))


def distinct_mask(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [n]: images [n, ...] kept greedily in order, each farther than ``threshold`` (and not equal)
    from every image kept before it. The count of True is the batch's number of distinct images."""
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return kept_greedily(torch.cdist(_flat(images), _flat(images)), threshold)


def kept_greedily(d: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [n]: :func:`distinct_mask` from the pairwise distances d [n, n] already computed (the diagonal
    is never read)."""
    n = d.shape[0]
    keep = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        kept = keep[:i].nonzero().flatten()
        keep[i] = bool(kept.numel() == 0 or d[i, kept].min() > threshold)
    return keep


def new_mask(images: torch.Tensor, rated: torch.Tensor, prior_liked: torch.Tensor,
             quantile: float = NEAR_COPY_QUANTILE) -> torch.Tensor:
    """bool [n]: images [n, ...] that are not near-copies of any rated image [m, ...], the near-copy
    threshold being the ``quantile`` of independent prior samples' [p, ...] distance to the rated images."""
    if rated.shape[0] == 0 or prior_liked.shape[0] == 0 or images.shape[0] == 0:
        return torch.ones(images.shape[0], dtype=torch.bool)
    threshold = torch.quantile(nearest_distance(prior_liked, rated), quantile)
    return nearest_distance(images, rated) >= threshold


def take_home(images: torch.Tensor, liked: torch.Tensor, rated: torch.Tensor, prior_liked: torch.Tensor,
              calls: int | None = None, seconds: float | None = None) -> dict[str, float]:
    """The yield of a batch images [n, ...] whose liked images are ``liked`` (bool [n]), given every
    rated image [m, ...] and independent prior samples of the liked kind [p, ...] (the yardstick of
    both thresholds); with the network-call rows and seconds the batch's method spent, per 1,000 rows
    and per second too.

    Returns distinct (images of the batch that repeat no other), distinct_liked, new_liked (liked and
    not a near-copy of a rated image), yield (liked, new and distinct from one another), and
    yield_per_kcall / yield_per_s."""
    dup = duplicate_threshold(prior_liked)
    good = liked & new_mask(images, rated, prior_liked)
    out = {"distinct": int(distinct_mask(images, dup).sum()),
           "distinct_liked": int(distinct_mask(images[liked], dup).sum()),
           "new_liked": int(good.sum()), "yield": int(distinct_mask(images[good], dup).sum()),
           "duplicate_threshold": dup}
    if calls:
        out["yield_per_kcall"] = 1000.0 * out["yield"] / calls
    if seconds:
        out["yield_per_s"] = out["yield"] / seconds
    return out
