"""The outputs of ``apa compare``: compare.json (every number), compare.md (tables) and PNG plots.

Curves show the mean over seeds with a band from the smallest to the largest seed's value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from apa.atomic import write_file  # noqa: E402
from apa.evaluation.images import save_grid  # noqa: E402

LABELS = {"preferred_confident_share": "preferred ∧ confident share", "preferred_share": "preferred share",
          "confident_share": "confident share", "coverage_entropy": "coverage entropy (preferred classes)",
          "mean_pairwise_distance": "mean pairwise distance (oracle features)",
          "fd_preferred": "Fréchet distance to real preferred digits"}
REFERENCE_PREFIX = "papa@"


def budgets_text(budgets: list[int]) -> str:
    """8,16,...,80 for an arithmetic progression of four or more budgets, else the plain list."""
    steps = {b - a for a, b in zip(budgets, budgets[1:])}
    if len(budgets) >= 4 and len(steps) == 1:
        return f"{budgets[0]},{budgets[1]},...,{budgets[-1]}"
    return ",".join(map(str, budgets))


def command_line(cfg: dict[str, Any]) -> str:
    """The `apa compare` call that reproduces a comparison's configuration."""
    parts = ["apa compare", f"--prior {cfg['prior']}"]
    if cfg.get("prior_weights"):
        parts.append(f"--prior-weights {cfg['prior_weights']}")
    parts += [f"--prefer {','.join(map(str, cfg['prefer']))}", f"--budgets {budgets_text(list(cfg['budgets']))}",
              f"--seeds {cfg['seeds']}", f"--methods {','.join(cfg['methods'])}", f"--per-round {cfg['per_round']}",
              f"--eval-samples {cfg['eval_samples']}", f"--particles {cfg['particles']}", f"--steps {cfg['steps']}",
              f"--epochs {cfg.get('epochs', 200)}",
              f"--papa-lr {cfg['papa_lr']:g}", f"--papa-timesteps {cfg['papa_timesteps']}",
              f"--refine-t {cfg['refine_t']}", f"--yardstick {cfg.get('yardstick', 2048)}"]
    if cfg.get("papa_reference"):
        parts.append("--papa-reference")
    return " ".join(parts) + f" --out {cfg['out']}"


def _pm(stats: dict[str, float], digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def _pm_or_dash(m: dict[str, Any], key: str, digits: int) -> str:
    return _pm(m[key], digits) if key in m else "–"  # a result cached before the key was measured


def final_row(method: str, s: dict[str, Any]) -> str:
    """One table row at the method's largest evaluated budget."""
    last = max(s["by_budget"], key=int)
    m = s["by_budget"][last]
    return (f"| {method} | {last} | {_pm_or_dash(m, 'yield', 1)} | {_pm_or_dash(m, 'distinct', 1)} "
            f"| {_pm_or_dash(m, 'calls', 0)} | {_pm_or_dash(m, 'yield_per_kcall', 2)} "
            f"| {_pm(m['preferred_confident_share'])} | {_pm(m['preferred_share'])} "
            f"| {_pm(m['confident_share'])} | {_pm(m['coverage_entropy'])} | {_pm(m['mean_pairwise_distance'], 2)} "
            f"| {_pm(m['fd_preferred'], 1)} | {_pm(s['align_seconds'], 0)} | {s['eval_batch_seconds']['mean']:.0f} "
            f"| {s['oracle_ratings']['mean']:.0f} |")


def real_row(real: dict[str, Any]) -> str:
    return (f"| real digits (train split, preferred classes) | – | – | – | – | – | {real['preferred_confident_share']:.3f} "
            f"| {real['preferred_share']:.3f} | {real['confident_share']:.3f} | {real['coverage_entropy']:.3f} "
            f"| {real['mean_pairwise_distance']:.2f} | {real['fd_preferred']:.1f} | – | – | – |")


def budget_table(summary: dict[str, Any], metric: str) -> list[str]:
    """Rows: methods; columns: the comparison's budgets; cells: mean ± sd over seeds."""
    budgets = [str(b) for b in summary["config"]["budgets"]]
    lines = ["| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for method, s in summary["methods"].items():
        if method.startswith(REFERENCE_PREFIX):
            continue
        cells = [_pm(s["by_budget"][b][metric], 2) if b in s["by_budget"] else "–" for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict[str, Any], images: list[str]) -> str:
    cfg = summary["config"]
    head = ["| method | budget | yield: liked, new, distinct images | distinct images | network-call rows "
            "| yield per 1,000 rows | preferred ∧ confident | preferred | confident | coverage entropy | diversity (MPD) "
            "| FD to real preferred | alignment wall time (s) | one eval batch (s) | oracle ratings |",
            "|---" * 15 + "|"]
    rows = [final_row(m, s) for m, s in summary["methods"].items()]
    lines = ["# Comparison on one prior, one simulated user, one budget", "",
             f"Prior `{cfg['prior']}` (weights sha256 `{cfg['weights_sha256'][:12]}`), oracle user preferring "
             f"{list(cfg['prefer'])}, budgets {budgets_text(list(cfg['budgets']))} in rounds of {cfg['per_round']}, "
             f"seeds 0..{cfg['seeds'] - 1}, {cfg['eval_samples']} evaluation images per batch, {cfg['steps']} "
             f"sampling steps, {cfg['particles']} particles (fkc, guidance). Cells: mean ± sd over seeds.", "",
             "```", command_line(cfg), "```", "", "## At the full budget", "", *head, *rows, real_row(summary["real"]),
             "", "## Preferred ∧ confident share against feedback spent", "",
             *budget_table(summary, "preferred_confident_share"), "", "## Coverage entropy against feedback spent",
             "", *budget_table(summary, "coverage_entropy"), "", "## Fréchet distance against feedback spent", "",
             *budget_table(summary, "fd_preferred"), "", *[f"![{Path(p).stem}]({p})" for p in images]]
    return "\n".join(lines) + "\n"


def plot_metric(summary: dict[str, Any], metric: str, ax) -> None:
    """Mean over seeds against feedback spent, band min–max; references as horizontal lines."""
    for method, s in summary["methods"].items():
        bb = sorted(s["by_budget"], key=int)
        if method.startswith(REFERENCE_PREFIX):
            ax.axhline(s["by_budget"][bb[-1]][metric]["mean"], ls="--", c="k", lw=1, label=f"{method} labels")
            continue
        x = [int(b) for b in bb]
        mean = [s["by_budget"][b][metric]["mean"] for b in bb]
        line, = ax.plot(x, mean, marker="o", ms=3, label=method)
        ax.fill_between(x, [s["by_budget"][b][metric]["min"] for b in bb],
                        [s["by_budget"][b][metric]["max"] for b in bb], color=line.get_color(), alpha=0.15)
    ax.axhline(summary["real"][metric], ls=":", c="gray", lw=1, label="real digits")
    ax.set(xlabel="feedback spent (ratings)", ylabel=LABELS[metric])


def save_plot(summary: dict[str, Any], metrics: tuple[str, ...], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics) + 1.6, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        plot_metric(summary, metric, ax)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cost(summary: dict[str, Any], path: Path) -> Path:
    """Alignment wall time per method (bars, mean over seeds), labelled with the oracle ratings spent."""
    names = list(summary["methods"])
    secs = [summary["methods"][m]["align_seconds"]["mean"] for m in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.4))
    bars = ax.bar(names, secs, color="tab:blue")
    for bar, m in zip(bars, names):
        ax.annotate(f"{summary['methods'][m]['oracle_ratings']['mean']:.0f} ratings", (bar.get_x() + 0.05,
                    bar.get_height()), fontsize=7, va="bottom")
    ax.set(ylabel="alignment wall time (s, mean over seeds)")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_grids(out: Path, methods: list[str]) -> list[str]:
    """The first 64 images of seed 0's last evaluation batch of each method."""
    paths = []
    for m in methods:
        src = out / "runs" / f"{m}_seed0.npz"
        if src.exists():
            with np.load(src) as z:
                save_grid(torch.from_numpy(z["images"][:64]), out / "grids" / f"{m}.png", nrow=8)
            paths.append(f"grids/{m}.png")
    return paths


def write_outputs(out: Path, summary: dict[str, Any]) -> Path:
    """compare.json, the plots, the grids and compare.md; returns compare.md's path."""
    out = Path(out)
    write_file(out / "compare.json", json.dumps(summary, indent=1, default=float).encode(), mode=0o644)
    images = [save_plot(summary, ("preferred_confident_share",), out / "share_vs_feedback.png").name,
              save_plot(summary, ("mean_pairwise_distance", "coverage_entropy"), out / "diversity.png").name,
              save_plot(summary, ("fd_preferred",), out / "fd_vs_feedback.png").name,
              plot_cost(summary, out / "cost.png").name, *write_grids(out, list(summary["methods"]))]
    (out / "compare.md").write_text(markdown(summary, images))
    return out / "compare.md"
