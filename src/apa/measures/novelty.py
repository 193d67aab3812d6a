"""Is the final batch new, and is it what the sampler targets? Plain functions on tensors.

- Novelty: a final image of a preferred class is a *near-copy* when its pixel distance to the
  nearest liked rated image is below the 5th percentile of the same distance for independent
  prior samples of the preferred classes (so independent prior samples are near-copies 5% of the
  time by construction). The distance ratio is the median of the final images' nearest distance
  over the prior samples' median.
- Target fidelity: the final batch's class mix against the class mix of many plain prior samples
  importance-reweighted by exp(β_end·r(x0)), the target the exact weights aim at. Total variation
  between the two tells a sampler failure (they disagree) from a surrogate or tilt failure (they
  agree and the preferred share is low).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from apa.atomic import write_file
from apa.measures.metrics import NEAR_COPY_QUANTILE, nearest_distance
from apa.measures.yields import take_home
from apa.shipped import shipped_path
from apa.smc.sampler import sample_prior

def near_copies(final: torch.Tensor, liked: torch.Tensor, prior_preferred: torch.Tensor,
                quantile: float = NEAR_COPY_QUANTILE) -> dict[str, float]:
    """Novelty of the preferred final images [n, ...] against the liked rated images [m, ...], with
    independent prior samples of the preferred classes [p, ...] as the yardstick.

    Returns ``near_copy_share`` (share of the final images below the prior's ``quantile`` of the
    nearest distance; ``quantile`` for independent samples) and ``distance_ratio`` (median nearest
    distance of the final images over the prior samples'; 1 for independent samples, 0 for copies).
    NaN when there is nothing to measure (no preferred final image, no liked image, no prior sample).
    """
    if min(final.shape[0], liked.shape[0], prior_preferred.shape[0]) == 0:
        return {"near_copy_share": float("nan"), "distance_ratio": float("nan")}
    d_prior = nearest_distance(prior_preferred, liked)
    d_final = nearest_distance(final, liked)
    threshold = torch.quantile(d_prior, quantile)
    return {"near_copy_share": float((d_final < threshold).double().mean()),
            "distance_ratio": float(d_final.median() / d_prior.median().clamp_min(1e-12))}


def class_mix(labels: torch.Tensor, bins: int, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The share of each label 0..bins−1 among labels [n], weighted by softmax(log_weights) [n]
    when given (an importance-reweighted mix): -> [bins], summing to 1."""
    w = torch.ones(labels.shape[0], dtype=torch.float64) if log_weights is None else \
        torch.softmax(log_weights.double(), 0)
    return torch.zeros(bins, dtype=torch.float64).index_add_(0, labels.long(), w) / w.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """½·Σ|p − q| between two distributions over the same bins [b] (0: equal, 1: disjoint)."""
    return float(0.5 * (p.double() - q.double()).abs().sum())


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """(Σw)² / Σw² of importance weights given in log space [n]: how many equal-weight samples the
    reweighted mix is worth (its Monte Carlo error is about that of so many draws)."""
    w = torch.softmax(log_weights.double(), 0)
    return float(1.0 / w.pow(2).sum())


# ---------------------------------------------------------------- one session's final batch

REFERENCE_SAMPLES = 512  # plain prior samples a report compares the final batch with (drawn once, cached per prior)
UNSURE = 10  # the class bin of an image the simulated user's classifier is not confident about


def oracle_classes(user: Any, images: torch.Tensor) -> torch.Tensor:
    """The simulated user's class of each image [n] (UNSURE where it is not confident)."""
    top, pred = user.probabilities(images).max(dim=1)
    return torch.where(top >= user.confidence, pred, torch.full_like(pred, UNSURE))


def users_liked(user: Any, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """bool [n]: the simulated user likes the image [n, C, H, W]: its taste holds (a taste no class
    names), else its confident class (``oracle_classes``, [n]; computed when not given) is a preferred one."""
    taste = user.taste
    if taste is not None:
        return taste.liked(images)
    classes = oracle_classes(user, images) if classes is None else classes
    return torch.isin(classes, torch.tensor(list(user.prefer)))


def reference_name(sha: str, steps: int, n: int) -> str:
    """The file name of n plain samples of the prior whose weights have sha256 ``sha``, at ``steps`` steps."""
    return f"reference_{sha[:24]}_{steps}_{n}.safetensors"


def draw_reference(prior: Any, steps: int, n: int = REFERENCE_SAMPLES) -> torch.Tensor:
    """n plain samples of ``prior`` at ``steps`` steps, seed 0, clean particles [n, *event] (CPU)."""
    with torch.no_grad():
        return sample_prior(prior, n, steps, torch.Generator().manual_seed(0), batch_size=256, decode=False).cpu()


def prior_reference(prior: Any, sha: str, steps: int, cache: Path, n: int = REFERENCE_SAMPLES) -> torch.Tensor:
    """n plain samples of ``prior`` (weights sha256 ``sha``) at ``steps`` steps, clean particles [n, *event]:
    shipped beside the built-in priors' weights for the default step count (``scripts/ship_references.py``),
    else drawn once (seed 0) and cached in ``cache``."""
    name = reference_name(sha, steps, n)
    path = shipped_path(name) if shipped_path(name).is_file() else cache / name  # named by the weights' digest
    if path.is_file():
        try:
            return load_file(path)["particles"]
        except Exception:  # a damaged cache entry is drawn again
            pass
    z = draw_reference(prior, steps, n)
    path = cache / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, save({"particles": z.contiguous()}), mode=0o644, shared=True)
    except OSError:
        pass  # no cache: the next report draws it again
    return z


def final_checks(view: Any, reference: torch.Tensor) -> dict[str, Any]:
    """Novelty and target fidelity of a session's final batch (``view``: a ``records.FinalView``; its
    images [n, C, H, W] in [0, 1]) against ``reference`` plain prior particles [M, *event].

    - near-copies of the liked rated images (``near_copies``), among the final images the simulated
      user's classifier puts in a preferred class (every image for a person, with every prior sample
      as the yardstick);
    - with a classifier, the class mix of the final batch and of the reference reweighted by
      exp(β_end·r(x0)) under the final reward, their total variation, and the reweighting's ESS. The
      reweighted reference is the final batch's own target only from the noise end.
    """
    images, prior = view.images, view.prior
    with torch.no_grad():
        prior_images, rated = prior.decode(reference), prior.decode(view.rated)
    liked = rated[view.targets > 0]
    user = view.user
    out: dict[str, Any] = {"reference_samples": int(reference.shape[0]), "images": int(images.shape[0])}
    if user.probabilities is None:  # a person: no view of what they like in the batch
        every = torch.ones(images.shape[0], dtype=torch.bool)
        home = take_home(images, every, rated, prior_images)
        return {**out, **near_copies(images, liked, prior_images), "distinct": home["distinct"],
                "new": home["new_liked"]}
    prefer = torch.tensor(list(user.prefer))
    final_cls, prior_cls = oracle_classes(user, images), oracle_classes(user, prior_images)
    out.update(near_copies(images[torch.isin(final_cls, prefer)], liked, prior_images[torch.isin(prior_cls, prefer)]))
    final_liked, prior_liked = users_liked(user, images, final_cls), users_liked(user, prior_images, prior_cls)
    home = take_home(images, final_liked, rated, prior_images[prior_liked])
    out.update({k: home[k] for k in ("distinct", "distinct_liked", "new_liked", "yield")})
    with torch.no_grad():
        log_w = view.sampler.beta[1] * torch.cat([view.reward(z) for z in reference.split(256)]).double()
    target, batch = class_mix(prior_cls, UNSURE + 1, log_w), class_mix(final_cls, UNSURE + 1)
    return {**out, "target_mix": target.tolist(), "batch_mix": batch.tolist(),
            "target_tv": total_variation(batch, target), "target_ess": effective_sample_size(log_w),
            "target_is_own": view.target_is_own}
