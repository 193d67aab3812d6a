"""A session's report: ``report.json`` (every number), ``report.md``, ``report.html`` and PNGs a person can open.

Per round: feedback spent so far, the ratings, how well the surrogate fitted before the round predicted
its ratings (held out), the ESS trace and, for a simulated user, its view of the round's weighted particles
(preferred share, confident share). A prior-only baseline row shows the same view of plain prior samples
(computed once per prior and cached). Finally the same view of the final evaluation batch. Every figure
carries a caption and one sentence on how to read it; round grids show each particle's weight and mark
the images that were rated.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from apa.atomic import private  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from apa.evaluation.images import save_grid  # noqa: E402
from apa.session.state import SessionState  # noqa: E402

DASH = "–"  # shown where a number does not exist (no rating, no held-out score yet)
GRID_MAX = 64  # particles drawn per round grid (the heaviest, plus every shown one)
SKIP_COLOUR = (120, 120, 130)


def rating_colour(score: float, scale: tuple[float, float]) -> tuple[int, int, int]:
    """Red at the bottom of the rating scale, amber in the middle, green at the top."""
    lo, hi = scale
    t = min(1.0, max(0.0, (score - lo) / (hi - lo))) if hi > lo else 1.0
    red, amber, green = np.array([200, 40, 40]), np.array([210, 160, 0]), np.array([30, 140, 60])
    c = red + (amber - red) * (2 * t) if t < 0.5 else amber + (green - amber) * (2 * t - 1)
    return tuple(int(v) for v in c)


def score_text(score: float | None) -> str:
    return "skip" if score is None else f"{round(float(score), 2):g}"


# ---------------------------------------------------------------- numbers for reading


def pct(x: float | None) -> str:
    """A share in [0, 1] as a whole percentage; DASH when missing or not a number."""
    return DASH if x is None or not math.isfinite(float(x)) else f"{100 * float(x):.0f}%"


def num(x: float | None, digits: int = 2) -> str:
    return DASH if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}f}"


def class_label(c: int | str, names: tuple[str, ...]) -> str:
    """``Sandal (5)`` when the prior names its classes (``digit 5`` for MNIST's), else ``class 5``; a
    user that is not a class number (a CLIP or ImageNet user, ``apple``) keeps its own name."""
    if isinstance(c, str) and not c.lstrip("-").isdigit():
        return c
    c = int(c)
    if 0 <= c < len(names):
        return f"digit {c}" if names[c] == str(c) else f"{names[c]} ({c})"
    return f"class {c}"


def heldout_text(h: dict | None) -> str:
    """``{"accuracy": 0.75, "n": 4}`` -> ``75% of 4``; DASH before the surrogate has predicted anything."""
    if not h or h.get("accuracy") is None:
        return DASH
    return f"{pct(h['accuracy'])} of {h.get('n', '?')}"


# ---------------------------------------------------------------- what the report is made of


@dataclass(frozen=True)
class ReportView:
    """What a session's report shows: its state (store, configuration, read-only queries), the end's
    records, the prior that decodes its particles, and who rated."""

    state: SessionState
    records: dict[str, dict[str, Any]]  # final_eval, prior_baseline, final_checks (``Session.records``)
    prior: Any  # decodes particles; names the classes
    prefer: tuple | None  # the simulated user's preferred classes (None: a person, or a taste no class names)
    timings: dict[str, float]  # seconds per part of the work


def report_view(session: Any) -> ReportView:
    """The view of ``session`` (an ``apa.session.Session``) its report is made from."""
    return ReportView(session.state, session.records(), session.prior, session.feedback.prefer,
                      dict(session.timings))


def round_rows(state: SessionState) -> list[dict[str, Any]]:
    rows, spent, liked, changes = [], 0, state.liked_shares(), set(state.changes())
    for r in state.store.rounds():
        ratings = state.store.ratings(r["round"])
        scores = [x["score"] for x in sorted(ratings, key=lambda x: x["position"])]
        spent += sum(s is not None for s in scores)
        info = r["info"]
        rows.append({"round": r["round"], "feedback_spent": spent, "ratings": scores, "fit_loss": r["fit_loss"],
                     "liked_share": liked[len(rows)],
                     "surrogate_heldout": info.get("surrogate_heldout"), "shown": list(r["shown"]),
                     "guided": info.get("beta_used", False), "ess": info.get("ess", []),
                     "resampled_steps": int(sum(info.get("resampled", []))),
                     "unique_origins": info.get("unique_origins"), "eval": info.get("eval", {}),
                     "taste_changed": r["round"] in changes,
                     "change_detected": bool(info.get("change_detected")), "searched": info.get("searched"),
                     "reweight_every": info.get("reweight_every"),
                     "calls": (info.get("calls") or 0) + (info.get("fit_calls") or 0) if "calls" in info else None})
    return rows


def call_rows(rows: list[dict[str, Any]], checks: dict[str, Any]) -> dict[str, int | None]:
    """Network-call rows the session spent (``apa.priors.calls``): its rounds' (sampling and fitting),
    the final batch's, and both; None where a part was not counted (an older session)."""
    rounds = None if any(r.get("calls") is None for r in rows) else sum(r["calls"] for r in rows)
    final = checks.get("final_calls")
    return {"rounds": rounds, "final": final,
            "total": None if rounds is None or final is None else rounds + final}


def take_home_block(checks: dict[str, Any], calls: dict[str, int | None]) -> list[tuple]:
    """What the person takes home: distinct, new, liked images of the final batch and their network calls."""
    if "distinct" not in checks:
        return []
    of = f" of {checks['images']}" if "images" in checks else ""
    items = [f"distinct images (no two the same to within the closest 1% of independent prior samples): "
             f"**{checks['distinct']}**{of}"]
    if "yield" in checks:
        items.append(f"liked, new (no near-copy of a rated image) and distinct: **{checks['yield']}** "
                     f"(liked and distinct: {checks['distinct_liked']}; liked and new: {checks['new_liked']})")
    else:
        items.append(f"new (no near-copy of a rated image): **{checks['new']}**")
    if calls["total"]:
        per = f"; {1000 * checks['yield'] / calls['total']:.2f} liked new distinct images per 1,000" \
            if "yield" in checks else ""
        run = checks.get("final_run")
        mild = f" (mild tilt: {run['particles']} particles, potential every {run['reweight_every']} steps)" if run else ""
        items.append(f"network-call rows (ε, features and gradients, per image): rounds {calls['rounds']:,}, "
                     f"final batch {calls['final']:,}{mild}, total **{calls['total']:,}**{per}")
    return [("h2", "What you take home"), ("list", items)]


COLLAPSE_SHARE = 0.10  # a preferred class under this share of the preferred samples counts as collapsed


def collapse_warning(final: dict[str, Any], names: tuple[str, ...] = ()) -> str | None:
    """A one-line warning when a multi-class preference lost a class in the final batch, else None."""
    shares = final.get("preferred_class_shares") or {}
    if len(shares) < 2 or not final.get("preferred_confident_share"):
        return None
    low = {c: v for c, v in shares.items() if v < COLLAPSE_SHARE}
    if not low:
        return None
    named = ", ".join(f"{class_label(c, names)} at {100 * v:.0f}%" for c, v in sorted(low.items(), key=lambda kv: kv[1]))
    return (f"collapse warning: {named} of the preferred samples (under {100 * COLLAPSE_SHARE:.0f}%); "
            "the final batch under-represents part of the preference")


# ---------------------------------------------------------------- figures


def plot_share(rows: list[dict], final: dict, baseline: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    spent = [r["feedback_spent"] for r in rows if r["eval"]]
    for key, label in (("preferred_confident_share", "preferred and confident"), ("preferred_share", "preferred"),
                       ("confident_share", "confident (quality)")):
        ax.plot(spent, [r["eval"][key] for r in rows if r["eval"]], marker="o", label=label)
    for i, r in enumerate(row for row in rows if row["taste_changed"]):  # before this round's ratings
        ax.axvline(r["feedback_spent"] - sum(s is not None for s in r["ratings"]), c="tab:red", lw=1, ls="-.",
                   label="taste changed" if i == 0 else None)
    if final:
        ax.axhline(final.get("preferred_confident_share", np.nan), ls="--", c="k", lw=1, label="final batch")
    if baseline:
        ax.axhline(baseline.get("preferred_confident_share", np.nan), ls=":", c="gray", lw=1.2, label="prior only")
    ax.set(xlabel="feedback spent (ratings)", ylabel="share of weighted particles", ylim=(0, 1.02))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ess(rows: list[dict], n: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows):
        if r["ess"]:
            ax.plot(r["ess"], color=cmap(i / max(len(rows) - 1, 1)), label=f"round {r['round'] + 1}")
    ax.axhline(n / 2, ls=":", c="gray", lw=1)
    ax.set(xlabel="step", ylabel="ESS (before resampling)", ylim=(0, n * 1.05))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def weighted_grid(images: torch.Tensor, weights: np.ndarray, rated: dict[int, float | None], path: Path,
                  scale: tuple[float, float] = (1.0, 5.0), ncol: int = 8) -> list[int]:
    """Particles [N, C, H, W] ordered by weight, each with its weight under it; rated ones framed in their
    rating's colour with the rating in the corner. At most GRID_MAX tiles: the heaviest plus every rated one.
    Returns the particle indices drawn, in order."""
    order = [int(i) for i in np.argsort(-weights, kind="stable")]
    keep = set(order[:GRID_MAX]) | set(rated)
    order = [i for i in order if i in keep][:max(GRID_MAX, len(rated))]
    side = images.shape[-1]
    zoom = max(1, 84 // side) if side < 84 else 1
    tile, label, pad = side * zoom, 14, 4
    rows = math.ceil(len(order) / ncol)
    canvas = Image.new("RGB", (ncol * (tile + pad) + pad, rows * (tile + label + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for k, i in enumerate(order):
        r, c = divmod(k, ncol)
        left, top = pad + c * (tile + pad), pad + r * (tile + label + pad)
        arr = np.repeat(x[i], 3, axis=0) if x.shape[1] == 1 else x[i][:3]
        img = Image.fromarray(arr.transpose(1, 2, 0)).resize((tile, tile), Image.NEAREST)
        canvas.paste(img, (left, top))
        if i in rated:
            score = rated[i]
            colour = SKIP_COLOUR if score is None else rating_colour(score, scale)
            draw.rectangle([left - 2, top - 2, left + tile + 1, top + tile + 1], outline=colour, width=3)
            text = score_text(score)
            draw.rectangle([left, top, left + 7 * len(text) + 4, top + 12], fill=colour)
            draw.text((left + 2, top), text, fill="white")
        draw.text((left + 2, top + tile + 1), f"{100 * weights[i]:.1f}%", fill=(60, 60, 70))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return order


def round_grid(view: ReportView, row: dict, path: Path) -> dict[str, Any]:
    """Round ``row``'s particles with their weights and ratings; returns what the caption needs."""
    t = view.state.store.round_tensors(row["round"])
    weights = torch.softmax(t["log_weights"].double(), 0).numpy()
    shown = [int(i) for i in t["shown"].tolist()]
    rated = {shown[p]: s for p, s in enumerate(row["ratings"]) if p < len(shown)}
    with torch.no_grad():
        images = view.prior.decode(t["particles"])
    drawn = weighted_grid(images, weights, rated, path, view.state.scale)
    ess = 1.0 / float(np.sum(weights ** 2))
    return {"n": len(weights), "drawn": len(drawn), "drawn_weight": float(weights[drawn].sum()), "ess": ess,
            "rated": sum(s is not None for s in row["ratings"]), "skipped": sum(s is None for s in row["ratings"])}


# ---------------------------------------------------------------- the document, as blocks for Markdown and HTML


def setup_text(cfg: dict, human: bool, names: tuple[str, ...], prefer: tuple[int, ...] | None) -> str:
    fb = cfg["feedback"]
    if human:
        who = "rated by a person"
    else:
        who = (f"a simulated user (`{fb['name']}`) who prefers "
               + ", ".join(class_label(c, names) for c in prefer)) if prefer else f"feedback `{fb['name']}`"
    s, sm = cfg["session"], cfg["sampler"]
    return (f"Prior `{cfg['prior']['name']}`, {who}. Budget {s['budget']} ratings, {s['per_round']} images a round, "
            f"{sm['particles']} particles × {sm['steps']} steps, β {sm['beta'][0]:g} → {sm['beta'][1]:g} "
            f"({sm.get('beta_schedule', 'linear')}), {sm.get('weights', 'rate')} weights, surrogate "
            f"{cfg['surrogate']['kind']} ({cfg['surrogate'].get('loss', 'mse')}), "
            f"reward at {sm['reward_at']} ({sm['jacobian']} Jacobian), {explore_text(s)}seed {s['seed']}.")


def explore_text(s: dict) -> str:
    """How the session drew its shown images and final batch, for the report's first line."""
    rounds = s.get("explore_rounds")
    which = ("each guided round" if rounds is None else "the first guided round" if rounds == 1
             else f"the first {rounds} guided rounds")
    out = f"{s.get('explore', 0.0):.0%} of {which} from the plain prior, " if s.get("explore") and rounds != 0 else ""
    start = s.get("final_start", "noise")
    return out + (f"final batch from the {start} rated images, last {s.get('restart', 0.3):g} of the steps, "
                  if start != "noise" else "final batch from the noise end, ")


def rounds_table(rows: list[dict], baseline: dict, oracle: bool) -> tuple[list[str], list[list[str]]]:
    head = ["round", "feedback spent", "ratings", "liked", "mean rating", "surrogate held out", "min ESS"]
    if oracle:
        head += ["preferred & confident", "confident"]
    body = []
    if oracle and baseline:
        body.append(["prior only", "0", DASH, DASH, DASH, DASH, DASH, pct(baseline.get("preferred_confident_share")),
                     pct(baseline.get("confident_share"))])
    for r in rows:
        rated = [s for s in r["ratings"] if s is not None]
        ratings = " ".join("·" if s is None else score_text(s) for s in r["ratings"]) or DASH
        mark = (" (taste changed: detected)" if r["change_detected"] else " (taste changed)") if r["taste_changed"] else ""
        mark += f" (search: {r['searched']})" if r.get("searched") else ""
        mark += f" (mild tilt: potential every {r['reweight_every']} steps)" if r.get("reweight_every") else ""
        line = [str(r["round"] + 1) + mark, str(r["feedback_spent"]), ratings, pct(r["liked_share"]),
                num(np.mean(rated)) if rated else DASH,
                heldout_text(r["surrogate_heldout"]), num(min(r["ess"]), 1) if r["ess"] else DASH]
        if oracle:
            line += [pct(r["eval"].get("preferred_confident_share")), pct(r["eval"].get("confident_share"))]
        body.append(line)
    return head, body


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def final_gap_note(before: float, share: float, particles: int, n: int) -> str | None:
    """Why the final batch can score below the last round (None when it does not)."""
    if share >= before:
        return None
    noise = 2 * (stderr(before, particles) + stderr(share, n))
    gap = f"The final batch scores below the last round ({pct(share)} against {pct(before)}). "
    if share >= before - noise:
        return gap + (f"A round's share is measured on its {particles} weighted particles, the final batch's on {n} "
                      f"fresh samples; their standard errors are about ±{pct(stderr(before, particles))} and "
                      f"±{pct(stderr(share, n))}, so a gap of this size is sampling noise, not lost alignment.")
    return gap + ("The gap is larger than sampling noise: the final batch is drawn with the surrogate refitted on the "
                  "last round's ratings, the last round with the surrogate before it, so the last refit moved the "
                  "sampler; compare the last round's ratings with the final grid.")


def final_blocks(rows: list[dict], final: dict, names: tuple[str, ...], particles: int) -> list[tuple]:
    if not final:
        return []
    n = final.get("n", 0)
    share = final.get("preferred_confident_share")
    classes = ", ".join(f"{class_label(c, names)} {pct(v)}"
                        for c, v in (final.get("preferred_class_shares") or {}).items())
    blocks: list[tuple] = [("h2", "Final evaluation batch"), ("list", [
        f"preferred and confident: **{pct(share)}** of {n} samples (resampled to equal weights)",
        f"preferred: {pct(final.get('preferred_share'))}; confident: {pct(final.get('confident_share'))}",
        f"preferred classes among the preferred and confident samples: {classes or DASH}"])]
    last = next((r["eval"] for r in reversed(rows) if r["eval"]), {})
    if share is not None and last.get("preferred_confident_share") is not None:
        note = final_gap_note(last["preferred_confident_share"], share, particles, n)
        if note:
            blocks.append(("p", note))
    hist = final.get("class_histogram") or []
    if hist:
        rows_ = [[class_label(c, names), str(k)] for c, k in enumerate(hist) if k]
        blocks.append(("table", ["class", "confident samples"], rows_ or [[DASH, "0"]]))
    warning = collapse_warning(final, names)
    if warning:
        blocks.append(("warn", warning))
    return blocks


LATE_ROUND = 2  # "from round 3 on": the rounds after the surrogate has seen two rounds of ratings


def liked_text(rows: list[dict]) -> str | None:
    """What share of the shown images the user liked, over the session and from round 3 on."""
    done = [r["liked_share"] for r in rows if r["liked_share"] is not None]
    late = [r["liked_share"] for r in rows[LATE_ROUND:] if r["liked_share"] is not None]
    if not done:
        return None
    return (f"Shown images the user liked: **{pct(sum(done) / len(done))}** over the session"
            + (f", {pct(sum(late) / len(late))} from round {LATE_ROUND + 1} on." if late else "."))


def checks_blocks(checks: dict, names: tuple[str, ...]) -> list[tuple]:
    """The final batch's novelty and its class mix against the reweighted prior (see evaluation/novelty.py)."""
    if not checks:
        return []
    which = "the preferred final images" if "target_mix" in checks else "the final images"
    items = [f"near-copies of the liked rated images: **{pct(checks.get('near_copy_share'))}** of {which} "
             f"(independent prior samples: 5% by construction); median distance to the nearest liked "
             f"image {num(checks.get('distance_ratio'))} × the prior samples' (1 = as new as the prior's own)"]
    blocks: list[tuple] = [("h2", "New images, and the sampler's target"), ("list", items)]
    if "target_mix" in checks:
        own = ("the final batch's own target" if checks["target_is_own"] else
               "the target from the noise end (this final batch restarts from the liked images, so it is not its own)")
        items.append(f"class mix against {checks['reference_samples']} plain prior samples reweighted by "
                     f"exp(β_end·r) under the final reward ({own}): total variation **{num(checks['target_tv'])}** "
                     f"(reweighting ESS {num(checks['target_ess'], 0)})")
        labels = [class_label(c, names) for c in range(len(checks["batch_mix"]) - 1)] + ["not confident"]
        body = [[lab, pct(b), pct(t)] for lab, b, t in zip(labels, checks["batch_mix"], checks["target_mix"])
                if max(b, t) >= 0.005]
        blocks.append(("table", ["class", "final batch", "reweighted prior"], body))
        blocks.append(("read", "Where the two columns disagree, the sampler missed its own target (too few particles, "
                       "a collapsed population); where they agree and the preferred share is low, the surrogate or the "
                       "tilt is at fault."))
    return blocks


def document(view: ReportView, rows, final, baseline, figures, checks: dict | None = None) -> list[tuple]:
    cfg = view.state.cfg.to_dict()
    names = view.prior.class_names
    human = cfg["feedback"]["name"] == "human"
    oracle = any(r["eval"] for r in rows) or bool(final)
    head, body = rounds_table(rows, baseline, oracle)
    read = ("Each row is one round: the ratings given (· a skipped image), their mean, and how well the surrogate "
            "fitted on the earlier rounds predicted this round's ratings before seeing them (“held out”: its accuracy "
            "on that many ratings; – where there was no surrogate yet). A fit to its own training ratings would say "
            "little: the surrogate can interpolate them.")
    if oracle:
        read += (" The shares are the simulated user's view of the round's particles after resampling by weight; "
                 "the “prior only” row is the same view of plain prior samples, the level feedback has to beat.")
    blocks: list[tuple] = [("h1", "apa alignment report"), ("p", setup_text(cfg, human, names, view.prefer)),
                           ("h2", "Rounds"), ("table", head, body), ("read", read)]
    liked = liked_text(rows)
    if liked:
        blocks.append(("p", liked))
    blocks += final_blocks(rows, final, names, view.state.cfg.sampler.particles)
    blocks += take_home_block(checks or {}, call_rows(rows, checks or {}))
    blocks += checks_blocks(checks or {}, names)
    blocks.append(("h2", "Figures"))
    blocks += [("figure", *f) for f in figures]
    return blocks


def inline_md_to_html(text: str) -> str:
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for kind, *a in blocks:
        if kind == "h1":
            lines += [f"# {a[0]}", ""]
        elif kind == "h2":
            lines += [f"## {a[0]}", ""]
        elif kind in ("p", "read"):
            lines += [f"*{a[0]}*" if kind == "read" else a[0], ""]
        elif kind == "list":
            lines += [f"- {x}" for x in a[0]] + [""]
        elif kind == "warn":
            lines += [f"> **{a[0]}**", ""]
        elif kind == "table":
            head, body = a
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body] + [""]
        elif kind == "figure":
            src, caption, how = a
            lines += [f"![{caption}]({src})", "", f"**{caption}** {how}", ""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """body { font: 15px/1.5 system-ui, sans-serif; max-width: 980px; margin: 24px auto; padding: 0 16px; color: #1d2330; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde1e7; padding: 4px 10px; text-align: right; }
td { white-space: nowrap; }
th { background: #f2f4f7; } td:first-child, th:first-child { text-align: left; }
.read { color: #556; font-style: italic; }
.warn { background: #fdecec; border: 1px solid #f1b0b0; padding: 8px 12px; border-radius: 6px; }
figure { margin: 18px 0; } figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #dde1e7; }
figcaption { margin-top: 4px; } code { background: #f2f4f7; padding: 0 3px; border-radius: 3px; }
"""


def to_html(blocks: list[tuple]) -> str:
    out = ['<!doctype html>', '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<title>apa alignment report</title><link rel="stylesheet" href="report.css"></head><body>']
    for kind, *a in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(a[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{inline_md_to_html(a[0])}</p>")
        elif kind == "read":
            out.append(f'<p class="read">{inline_md_to_html(a[0])}</p>')
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{inline_md_to_html(x)}</li>" for x in a[0]) + "</ul>")
        elif kind == "warn":
            out.append(f'<p class="warn"><strong>{html.escape(a[0])}</strong></p>')
        elif kind == "table":
            head, body = a
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</tbody></table>")
        elif kind == "figure":
            src, caption, how = a
            out.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                       f"<figcaption><strong>{html.escape(caption)}</strong> {html.escape(how)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- writing it


def figures(view: ReportView, rows: list[dict], final: dict, baseline: dict, root: Path
            ) -> list[tuple[str, str, str]]:
    """Writes the PNGs; returns (file, caption, how to read it) for each."""
    out = []
    n = view.state.cfg.sampler.particles
    if any(r["eval"] for r in rows):
        plot_share(rows, final, baseline, root / "preferred_share.png")
        out.append(("preferred_share.png", "Preferred share against feedback spent.",
                    "Each point is one round's weighted particles as the simulated user sees them; the dashed line is "
                    "the final batch, the dotted grey line plain prior samples; higher is better."))
    plot_ess(rows, n, root / "ess.png")
    out.append(("ess.png", "Effective sample size at each sampler step, one line per round.",
                f"Of the {n} particles, how many carry the weight; under the dotted line (half) the sampler resamples, "
                "and a line near zero means a few particles carry nearly all of it."))
    for r in rows:
        name = f"grids/round_{r['round']:02d}.png"
        c = round_grid(view, r, root / name)
        some = (f"the {c['drawn']} heaviest of {c['n']} particles ({pct(c['drawn_weight'])} of the weight)"
                if c["drawn"] < c["n"] else f"all {c['n']} particles")
        out.append((name, f"Round {r['round'] + 1}: {some}, ordered by weight; {c['rated']} rated, {c['skipped']} skipped.",
                    "The number under each image is its weight, so the heaviest images are what the sampler proposes; "
                    "framed images were shown to the user, the frame's colour and corner giving the rating "
                    f"(red lowest … green highest, grey skipped). "
                    f"These final weights have an effective sample size of {c['ess']:.1f} (equal after resampling)."))
    final_images = view.state.store.final_images()
    if final_images is not None:
        total = len(final_images)
        save_grid(final_images[:64], root / "grids" / "final.png", nrow=8)
        out.append(("grids/final.png", f"Final batch: {min(64, total)} of {total} samples, equal weights.",
                    "Samples from the sampler guided by the last surrogate, resampled so each counts the same; "
                    "this is what the aligned model produces."))
    return out


@private  # the report shows a person's ratings and images: 0600 files, 0700 grids/
def write_report(view: ReportView) -> Path:
    """Write the report of the session ``view`` shows (``report_view(session)``) beside it; returns report.md."""
    root = view.state.store.root
    cfg = view.state.cfg.to_dict()
    rows = round_rows(view.state)
    recorded = view.records
    final, baseline, checks = recorded["final_eval"], recorded["prior_baseline"], recorded["final_checks"]
    names = view.prior.class_names
    figs = figures(view, rows, final, baseline, root)
    blocks = document(view, rows, final, baseline, figs, checks)
    report = {"config": cfg, "rounds": rows, "final": final, "prior_baseline": baseline, "final_checks": checks,
              "calls": call_rows(rows, checks),
              "collapse_warning": collapse_warning(final, names), "timings": view.timings}
    md = view.state.store.report_path
    md.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    md.write_text(to_markdown(blocks))
    (root / "report.css").write_text(CSS)
    md.with_suffix(".html").write_text(to_html(blocks))
    return md
