"""Print the per-class and per-threshold tables of an oracle's model card.

Usage: python scripts/oracle_tables.py DATASET [WEIGHTS]   (default: the shipped oracle)
On the dataset's 10,000-image (fashion) or 1,000-image (mnist) held-out split: accuracy and
confident share per class, the share at or above each confidence threshold with its accuracy, and
the confident share of held-out images under mild Gaussian noise.
"""

from __future__ import annotations

import sys

import torch

from apa import data
from apa.feedback.classifier import load_oracle, predict_proba


def main(dataset: str, weights: str | None = None) -> None:
    model = load_oracle(dataset, weights)
    arrays = data.load(dataset)
    x = torch.from_numpy(data.to_unit(arrays["test_images"]))
    y = torch.from_numpy(arrays["test_labels"]).long()
    top, pred = predict_proba(model, x).max(1)
    names = data.class_names(dataset)
    print(f"temperature {model.config.temperature}\n\n| class | accuracy | confident share |\n|---|---|---|")
    for c in range(10):
        m = y == c
        print(f"| {c} {names[c]} | {(pred[m] == c).float().mean():.3f} | {(top[m] >= 0.9).float().mean():.3f} |")
    print("\n| threshold | share at or above | accuracy there |\n|---|---|---|")
    for t in (0.5, 0.7, 0.8, 0.9):
        m = top >= t
        print(f"| {t} | {m.float().mean():.3f} | {(pred[m] == y[m]).float().mean():.3f} |")
    gen = torch.Generator().manual_seed(1234)
    for s in (0.1, 0.2, 0.3):
        noisy = (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        print(f"\nheld-out + N(0, {s}²): confident {(predict_proba(model, noisy).max(1).values >= 0.9).float().mean():.3f}",
              end="")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:3])
