"""A session's report: ``report.json`` (every number), ``report.md`` and PNGs a person can open.

Per round: feedback spent so far, the ratings, the surrogate's fit loss, the ESS trace, and the
simulated user's view of the round's weighted particles (preferred share, confident share,
class histogram). Finally the same view of the final evaluation batch.
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

from apa.evaluation.images import save_grid  # noqa: E402


def round_rows(session) -> list[dict[str, Any]]:
    rows, spent = [], 0
    for r in session.store.rounds():
        scores = [x["score"] for x in session.store.ratings(r["round"])]
        spent += sum(s is not None for s in scores)
        info = r["info"]
        rows.append({"round": r["round"], "feedback_spent": spent, "ratings": scores, "fit_loss": r["fit_loss"],
                     "guided": info.get("beta_used", False), "ess": info.get("ess", []),
                     "resampled_steps": int(sum(info.get("resampled", []))),
                     "unique_origins": info.get("unique_origins"), "eval": info.get("eval", {})})
    return rows


def final_eval(session, path: Path) -> dict[str, Any]:
    evaluate = getattr(session.feedback, "evaluate", None)
    if evaluate is None or not path.exists():
        return {}
    with np.load(path) as z:
        return evaluate(torch.from_numpy(z["images"]))


COLLAPSE_SHARE = 0.10  # a preferred class under this share of the preferred samples counts as collapsed


def collapse_warning(final: dict[str, Any]) -> str | None:
    """A one-line warning when a multi-class preference lost a class in the final batch, else None."""
    shares = final.get("preferred_class_shares") or {}
    if len(shares) < 2 or not final.get("preferred_confident_share"):
        return None
    low = {c: v for c, v in shares.items() if v < COLLAPSE_SHARE}
    if not low:
        return None
    named = ", ".join(f"class {c} at {100 * v:.0f}%" for c, v in sorted(low.items(), key=lambda kv: kv[1]))
    return (f"collapse warning: {named} of the preferred samples (under {100 * COLLAPSE_SHARE:.0f}%); "
            "the final batch under-represents part of the preference")


def plot_share(rows: list[dict], final: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    spent = [r["feedback_spent"] for r in rows if r["eval"]]
    for key, label in (("preferred_confident_share", "preferred and confident"), ("preferred_share", "preferred"),
                       ("confident_share", "confident (quality)")):
        ax.plot(spent, [r["eval"][key] for r in rows if r["eval"]], marker="o", label=label)
    if final:
        ax.axhline(final.get("preferred_confident_share", np.nan), ls="--", c="k", lw=1, label="final batch")
    ax.set(xlabel="feedback spent (ratings)", ylabel="share of weighted particles", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ess(rows: list[dict], n: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows):
        if r["ess"]:
            ax.plot(r["ess"], color=cmap(i / max(len(rows) - 1, 1)), label=f"round {r['round']}")
    ax.axhline(n / 2, ls=":", c="gray", lw=1)
    ax.set(xlabel="step", ylabel="ESS (before resampling)", ylim=(0, n * 1.05))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(cfg: dict, rows: list[dict], final: dict, images: list[str]) -> str:
    lines = ["# apa alignment report", "", f"prior `{cfg['prior']['name']}`, feedback `{cfg['feedback']['name']}`"
             f" (prefer {cfg['feedback']['prefer']}), budget {cfg['session']['budget']}, "
             f"{cfg['session']['per_round']} per round, {cfg['sampler']['particles']} particles x "
             f"{cfg['sampler']['steps']} steps, beta {cfg['sampler']['beta']}, surrogate {cfg['surrogate']['kind']}, "
             f"r at {cfg['sampler']['reward_at']} ({cfg['sampler']['jacobian']} Jacobian), seed {cfg['session']['seed']}",
             "", "| round | feedback spent | mean rating | fit loss | min ESS | preferred & confident | confident |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rated = [s for s in r["ratings"] if s is not None]
        ev = r["eval"]
        lines.append(f"| {r['round']} | {r['feedback_spent']} | {np.mean(rated) if rated else float('nan'):.2f} "
                     f"| {r['fit_loss'] if r['fit_loss'] is not None else float('nan'):.3f} "
                     f"| {min(r['ess']) if r['ess'] else float('nan'):.1f} "
                     f"| {ev.get('preferred_confident_share', float('nan')):.2f} | {ev.get('confident_share', float('nan')):.2f} |")
    if final:
        lines += ["", "## Final evaluation batch (resampled to equal weights)", "",
                  f"- preferred and confident: **{final.get('preferred_confident_share', float('nan')):.3f}**",
                  f"- preferred: {final.get('preferred_share', float('nan')):.3f}; confident: "
                  f"{final.get('confident_share', float('nan')):.3f}",
                  f"- preferred classes among preferred samples: {final.get('preferred_class_shares')}",
                  f"- class histogram (confident): {final.get('class_histogram')}"]
        warning = collapse_warning(final)
        if warning:
            lines += ["", f"> **{warning}**"]
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in images]]
    return "\n".join(lines) + "\n"


def write_report(session) -> Path:
    root = session.store.root
    cfg = session.cfg.to_dict()
    rows = round_rows(session)
    final = final_eval(session, root / "final_samples.npz")
    images = []
    if any(r["eval"] for r in rows):
        plot_share(rows, final, root / "preferred_share.png")
        images.append("preferred_share.png")
    plot_ess(rows, session.cfg.sampler.particles, root / "ess.png")
    images.append("ess.png")
    for r in rows:
        t = session.store.round_tensors(r["round"])
        with torch.no_grad():
            save_grid(session.prior.decode(t["particles"]), root / "grids" / f"round_{r['round']:02d}.png", nrow=8)
        images.append(f"grids/round_{r['round']:02d}.png")
    if (root / "final_samples.npz").exists():
        with np.load(root / "final_samples.npz") as z:
            save_grid(torch.from_numpy(z["images"][:64]), root / "grids" / "final.png", nrow=8)
        images.append("grids/final.png")
    report = {"config": cfg, "rounds": rows, "final": final, "collapse_warning": collapse_warning(final),
              "timings": getattr(session, "timings", {})}
    (root / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (root / "report.md").write_text(markdown(cfg, rows, final, images))
    return root / "report.md"
