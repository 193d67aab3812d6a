"""How good a shipped prior is, judged by the shipped oracle (the model card's numbers).

Confident share (max probability >= 0.9) beside the same oracle's share on held-out real images,
class histograms (of the confident samples, and of all samples by the oracle's top class), and the
Fréchet distance in the oracle's feature space to held-out real images, printed beside the
real-vs-real distance (two disjoint halves of real data) as the floor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apa import data
from apa.measures.metrics import frechet_distance
from apa.feedback.classifier import extract_features, load_oracle, predict_proba
from apa.priors.ddpm import load_prior
from apa.smc.sampler import sample_prior


def _confident_by_top_class(top: torch.Tensor, pred: torch.Tensor, confidence: float) -> list[float | None]:
    """For each class, the share at or above ``confidence`` among the images it is the top class of
    (None for a class that tops none). top, pred [n] -> 10 values."""
    return [round(float((top[pred == c] >= confidence).float().mean()), 4) if (pred == c).any() else None
            for c in range(10)]


def quality(images: torch.Tensor, oracle, real: torch.Tensor, confidence: float = 0.9,
            real_labels: torch.Tensor | None = None) -> dict:
    """Oracle-judged quality of images [n, 1, 28, 28] against real held-out images [m, 1, 28, 28].

    With ``real_labels`` [m] it also reports the oracle's accuracy on the real images.
    """
    probs = predict_proba(oracle, images)
    top, pred = probs.max(1)
    conf = top >= confidence
    hist = torch.bincount(pred[conf], minlength=10)
    real_top, real_pred = predict_proba(oracle, real).max(1)
    fa, fr = extract_features(oracle, images), extract_features(oracle, real)
    by_class = [_confident_by_top_class(top, pred, confidence), _confident_by_top_class(real_top, real_pred, confidence)]
    ref, other = fr[::2], fr[1::2]  # interleaved halves: every class in both (the split is sorted by class)
    m = min(len(fa), len(other))
    return {"n": int(images.shape[0]), "confident_share": float(conf.float().mean()),
            "real_confident_share": float((real_top >= confidence).float().mean()),  # the oracle on real images
            "class_shares_of_confident": [round(float(c) / max(int(conf.sum()), 1), 4) for c in hist],
            "class_shares_of_all": [round(float(c) / len(pred), 4) for c in torch.bincount(pred, minlength=10)],
            "confident_share_by_top_class": by_class[0],  # per class: the confident share of those it tops
            "real_confident_share_by_top_class": by_class[1],
            "fd_to_real": frechet_distance(fa[:m], ref),  # m samples vs one real half
            "fd_real_vs_real": frechet_distance(other[:m], ref),  # m real images vs the same half: the floor
            "fd_sizes": [m, len(ref)],
            **({} if real_labels is None else
               {"oracle_test_accuracy": float((real_pred == real_labels).float().mean())})}


def evaluate_prior(dataset: str, n: int = 512, steps: int = 25, seed: int = 0, prior_path: Path | None = None,
                   oracle_path: Path | None = None, device: str = "cpu") -> str:
    """The model card's report (JSON) of a prior (the shipped one by default) judged by an oracle.

    The networks run on ``device``; the draws come from a CPU generator, so the samples do not
    depend on it beyond floating-point rounding.
    """
    prior, oracle = load_prior(dataset, prior_path), load_oracle(dataset, oracle_path)
    prior.model.to(device)
    oracle.to(device)
    arrays = data.load(dataset)
    real = torch.from_numpy(data.to_unit(arrays["test_images"]))
    q = quality(sample_prior(prior, n, steps, torch.Generator().manual_seed(seed)), oracle, real,
                real_labels=torch.from_numpy(arrays["test_labels"]).long())
    q["dataset"], q["steps"], q["seed"] = dataset, steps, seed
    return json.dumps(q, indent=2)


