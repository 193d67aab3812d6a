"""What `apa align` shows in the terminal: one progress bar over the rounds and a closing summary.

The bar counts feedback spent against the budget; its postfix shows the round (1-based, of the
planned count), the round's preferred∧confident share where the simulated user can judge it,
the mean rating, the minimum ESS and the surrogate's held-out accuracy on the round's ratings.
"""

from __future__ import annotations

import math
from typing import Any

from tqdm.auto import tqdm


class RoundProgress:
    """An outer bar over a session's rounds; ``update(r, session)`` after each completed round."""

    def __init__(self, session, enabled: bool = True):
        budget, per_round = session.cfg.session.budget, session.cfg.session.per_round
        self.rounds = math.ceil(budget / per_round)
        self.bar = tqdm(total=budget, initial=session.store.spent(), unit="rating", desc="align",
                        disable=not enabled, dynamic_ncols=True)

    def update(self, r: int, session) -> None:
        row = session.store.rounds()[r]
        self.bar.update(session.store.spent() - self.bar.n)
        self.bar.set_postfix_str(round_postfix(r, self.rounds, row, session.store.ratings(r)))

    def close(self) -> None:
        self.bar.close()


def round_postfix(r: int, rounds: int, row: dict[str, Any], ratings: list[dict]) -> str:
    """"round 3/10 · preferred 0.84 · mean rating +0.50 · min ESS 9.1 · held-out acc 0.88"."""
    info = row.get("info") or {}
    parts = [f"round {r + 1}/{rounds}"]
    share = (info.get("eval") or {}).get("preferred_confident_share")
    if share is not None:
        parts.append(f"preferred {share:.2f}")
    scores = [x["score"] for x in ratings if x["score"] is not None]
    if scores:
        parts.append(f"mean rating {sum(scores) / len(scores):+.2f}")
    if info.get("ess"):
        parts.append(f"min ESS {min(info['ess']):.1f}")
    heldout = info.get("surrogate_heldout")
    if heldout:
        parts.append(f"held-out acc {heldout['accuracy']:.2f}")
    return " · ".join(parts)


def closing_summary(report: dict[str, Any], wall_s: float, report_path: str) -> dict[str, Any]:
    """The few numbers a person wants at the end, as a dict (``--json`` prints it as it is)."""
    final = report.get("final") or {}
    prior = report.get("prior_baseline") or {}
    return {"ratings": sum(len([s for s in r["ratings"] if s is not None]) for r in report.get("rounds", [])),
            "preferred_confident": final.get("preferred_confident_share"),
            "prior_preferred_confident": prior.get("preferred_confident_share"),
            "confident": final.get("confident_share"),
            "preferred_class_shares": final.get("preferred_class_shares"),
            "collapse_warning": report.get("collapse_warning"),
            "liked_shown": _mean([r.get("liked_share") for r in report.get("rounds", [])]),
            "near_copy_share": (report.get("final_checks") or {}).get("near_copy_share"),
            "take_home": {k: (report.get("final_checks") or {}).get(k) for k in ("distinct", "yield")},
            "calls": (report.get("calls") or {}).get("total"),
            "wall_s": round(wall_s, 1), "report": report_path}


def _mean(values: list) -> float | None:
    done = [v for v in values if v is not None]
    return sum(done) / len(done) if done else None


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The closing summary as a few lines of text."""
    lines = [f"session complete: {summary['ratings']} ratings in {summary['wall_s']:.0f} s"]
    if summary["preferred_confident"] is not None:
        versus = (f" (the prior alone: {summary['prior_preferred_confident']:.2f})"
                  if summary["prior_preferred_confident"] is not None else "")
        lines.append(f"final batch: {summary['preferred_confident']:.2f} preferred and confident{versus}; "
                     f"{summary['confident']:.2f} confident")
    shares = summary["preferred_class_shares"]
    if shares and len(shares) > 1:
        lines.append("preferred classes: " + ", ".join(f"{c} {v:.0%}" for c, v in shares.items()))
    seen = []
    if summary.get("liked_shown") is not None:
        seen.append(f"shown images liked: {summary['liked_shown']:.2f}")
    if summary.get("near_copy_share") is not None and summary["near_copy_share"] == summary["near_copy_share"]:
        seen.append(f"final images that copy a liked rated one: {summary['near_copy_share']:.0%} (the prior's own: 5%)")
    if seen:
        lines.append("; ".join(seen))
    home, calls = summary.get("take_home") or {}, summary.get("calls")
    if home.get("yield") is not None:
        lines.append(f"take home: {home['yield']} distinct new images liked ({home['distinct']} distinct in all)"
                     + (f"; {calls:,} network-call rows, {1000 * home['yield'] / calls:.2f} per 1,000" if calls else ""))
    if summary["collapse_warning"]:
        lines.append(summary["collapse_warning"])
    lines.append(f"report: {summary['report']}")
    return lines
