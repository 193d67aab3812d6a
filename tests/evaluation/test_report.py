"""The report explains itself: readable numbers, class names, captions, a prior baseline row, HTML beside Markdown."""

from __future__ import annotations

import math

import pytest

from apa.evaluation import report as rp
from apa.feedback.classifier import parse_classes
from apa.data import class_names

FASHION = class_names("fashion")


def row(r: int, ratings, ev=None, heldout=None, spent=0, liked=None, changed=False, detected=False):
    return {"round": r, "feedback_spent": spent, "ratings": ratings, "fit_loss": 0.0, "surrogate_heldout": heldout,
            "liked_share": liked, "taste_changed": changed, "change_detected": detected,
            "shown": list(range(len(ratings))), "guided": r > 0, "ess": [8.0, 3.25], "resampled_steps": 1,
            "unique_origins": 4, "eval": ev or {}}


def test_numbers_read_as_percentages_and_dashes():
    assert rp.pct(0.020833333333333332) == "2%" and rp.pct(None) == rp.DASH and rp.pct(float("nan")) == rp.DASH
    assert rp.num(float("nan")) == rp.DASH and rp.num(3.14159) == "3.14"
    assert rp.heldout_text({"accuracy": 0.75, "n": 4}) == "75% of 4" and rp.heldout_text(None) == rp.DASH
    assert rp.class_label(7, FASHION) == "Sneaker (7)" and rp.class_label(3, class_names("mnist")) == "digit 3"
    assert rp.score_text(4.0) == "4" and rp.score_text(None) == "skip" and rp.score_text(0.333) == "0.33"


def test_human_rounds_table_has_no_oracle_columns_and_no_nan():
    head, body = rp.rounds_table([row(0, [5.0, None, 2.0, 3.0], liked=1 / 3), row(1, [None, None])], {}, oracle=False)
    assert "preferred & confident" not in head and "fit loss" not in head and "surrogate held out" in head
    assert body[0][:5] == ["1", "0", "5 · 2 3", "33%", "3.33"] and body[1][3] == rp.DASH and body[1][4] == rp.DASH
    assert not any("nan" in c for line in body for c in line)


def test_oracle_table_starts_with_the_prior_baseline_and_shows_held_out_scores():
    rows = [row(0, [1.0, -1.0], {"preferred_confident_share": 0.25, "confident_share": 0.5}),
            row(1, [1.0, 1.0], {"preferred_confident_share": 0.84, "confident_share": 0.9}, {"accuracy": 0.5, "n": 2})]
    head, body = rp.rounds_table(rows, {"preferred_confident_share": 0.3, "confident_share": 0.6}, oracle=True)
    assert body[0][0] == "prior only" and body[0][-2:] == ["30%", "60%"]
    assert body[1][5] == rp.DASH and body[2][5] == "50% of 2" and body[2][-2] == "84%"


def test_a_change_of_taste_is_marked_in_the_table_and_on_the_plot(tmp_path, monkeypatch):
    ev = lambda p: {"preferred_confident_share": p, "preferred_share": p, "confident_share": 0.9}  # noqa: E731
    rows = [row(0, [1.0, 1.0], ev(0.5), spent=2),
            row(1, [-1.0, -1.0], ev(0.1), {"accuracy": 0.0, "n": 2}, spent=4, changed=True, detected=True),
            row(2, [1.0, -1.0], ev(0.3), spent=6, changed=True)]
    _, body = rp.rounds_table(rows, {}, oracle=True)
    assert [line[0] for line in body] == ["1", "2 (taste changed: detected)", "3 (taste changed)"]
    _, body = rp.rounds_table([row(0, [-1.0]), {**row(1, [-1.0]), "searched": "farthest", "ess": []}], {}, oracle=True)
    assert [line[0] for line in body] == ["1", "2 (search: farthest)"] and body[1][6] == rp.DASH
    _, body = rp.rounds_table([row(0, [1.0]), {**row(1, [1.0]), "reweight_every": 5}], {}, oracle=True)
    assert [line[0] for line in body] == ["1", "2 (mild tilt: potential every 5 steps)"]
    lines = []
    monkeypatch.setattr(rp.plt.Axes, "axvline", lambda self, x, **kw: lines.append((x, kw.get("label"))))
    rp.plot_share(rows, {}, {}, tmp_path / "share.png")
    assert lines == [(2, "taste changed"), (4, None)]  # before the first rating of each such round


def test_a_final_batch_below_the_last_round_is_explained_and_collapse_names_classes():
    rows = [row(0, [1.0], {"preferred_confident_share": 0.84})]
    final = {"n": 64, "preferred_confident_share": 0.625, "preferred_share": 0.7, "confident_share": 0.8,
             "class_histogram": [0, 0, 0, 0, 0, 1, 0, 0, 0, 39], "preferred_class_shares": {5: 0.025, 9: 0.975}}
    blocks = rp.final_blocks(rows, final, FASHION, particles=8)
    text = rp.to_markdown(blocks)
    assert "scores below the last round (62% against 84%)" in text and "standard error" in text  # 8 particles
    assert "larger than sampling noise" in rp.final_gap_note(0.84, 0.2, 256, 256)
    assert rp.final_gap_note(0.5, 0.6, 8, 64) is None
    assert "Sandal (5) 2%" in text and "Ankle boot (9) | 39" in text
    assert "collapse warning: Sandal (5) at 2%" in text
    assert rp.collapse_warning({"preferred_confident_share": 0.5, "preferred_class_shares": {"1": 0.5, "4": 0.5}}) is None


def test_markdown_and_html_carry_captions_and_escape_text():
    blocks = [("h1", "apa alignment report"), ("p", "Prior `x`, <b>rated by a person</b>."),
              ("table", ["round"], [["1"]]), ("read", "How to read it."),
              ("figure", "grids/round_00.png", "Round 1: all 8 particles.", "The number under each image is its weight.")]
    md, page = rp.to_markdown(blocks), rp.to_html(blocks)
    assert "![Round 1: all 8 particles.](grids/round_00.png)" in md and "**Round 1: all 8 particles.** The number" in md
    assert "&lt;b&gt;rated by a person&lt;/b&gt;" in page and "<b>" not in page and "<code>x</code>" in page
    assert '<img src="grids/round_00.png"' in page and "<figcaption>" in page and 'href="report.css"' in page


def test_weighted_grid_orders_by_weight_and_marks_the_rated(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    images = torch.rand(10, 1, 28, 28)
    weights = np.array([0.05, 0.4, 0.05, 0.05, 0.2, 0.05, 0.05, 0.05, 0.05, 0.05])
    drawn = rp.weighted_grid(images, weights, {3: 5.0, 7: None}, tmp_path / "g.png", scale=(1.0, 5.0))
    assert drawn[:2] == [1, 4] and set(drawn) == set(range(10))
    assert Image.open(tmp_path / "g.png").size[0] > 8 * 56
    assert rp.rating_colour(5.0, (1.0, 5.0))[1] > rp.rating_colour(1.0, (1.0, 5.0))[1]


@pytest.mark.parametrize("text, want", [("sandal,sneaker,ankle-boot", (5, 7, 9)), ("Ankle_Boot, 0", (0, 9)),
                                        ("t-shirt", (0,)), ("T shirt/top,bag", (0, 8)), ([1, "coat"], (1, 4))])
def test_prefer_accepts_class_names(text, want):
    assert parse_classes(text, FASHION) == want


def test_prefer_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown class name 'sandals'.*5 Sandal"):
        parse_classes("sandals", FASHION)
    with pytest.raises(ValueError, match="class indices"):
        parse_classes("sandal")
    assert parse_classes("1,4,7,9") == (1, 4, 7, 9) and not math.isnan(1.0)


def test_the_share_of_shown_images_liked_is_given_over_the_session_and_from_round_3_on():
    rows = [row(0, [1.0], liked=0.25), row(1, [1.0], liked=0.5), row(2, [1.0], liked=1.0), row(3, [None], liked=None),
            row(4, [1.0], liked=0.5)]
    text = rp.liked_text(rows)
    assert "**56%** over the session" in text and "75% from round 3 on" in text
    assert rp.liked_text([row(0, [None])]) is None


def test_novelty_and_target_blocks_show_both_class_mixes_and_say_whose_target_it_is():
    mix = [0.0] * 11
    checks = {"near_copy_share": 0.04, "distance_ratio": 0.93, "reference_samples": 1024, "target_tv": 0.06,
              "target_ess": 180.0, "target_is_own": False, "batch_mix": [0.5] + mix[1:9] + [0.5, 0.0],
              "target_mix": [0.45] + mix[1:9] + [0.5, 0.05]}
    text = rp.to_markdown(rp.checks_blocks(checks, class_names("mnist")))
    assert "**4%** of the preferred final images" in text and "0.93" in text and "**0.06**" in text
    assert "not its own" in text and "| digit 0 | 50% | 45% |" in text and "| not confident | 0% | 5% |" in text
    assert "digit 1 |" not in text  # classes absent from both mixes are left out
    assert rp.checks_blocks({}, ()) == []


def test_the_take_home_block_counts_distinct_new_liked_images_and_the_calls():
    from apa.evaluation.report import call_rows, take_home_block

    checks = {"images": 256, "distinct": 188, "distinct_liked": 171, "new_liked": 221, "yield": 165,
              "final_calls": 18945}
    rows = [{"calls": 12000}, {"calls": 10652}]
    calls = call_rows(rows, checks)
    assert calls == {"rounds": 22652, "final": 18945, "total": 41597}
    (_, title), (_, items) = take_home_block(checks, calls)
    assert title == "What you take home" and "**188** of 256" in items[0] and "**165**" in items[1]
    assert "total **41,597**; 3.97 liked new distinct images per 1,000" in items[2] and "mild" not in items[2]
    mild = take_home_block({**checks, "final_run": {"particles": 384, "reweight_every": 5}}, calls)[1][1][2]
    assert "final batch 18,945 (mild tilt: 384 particles, potential every 5 steps)" in mild
    assert call_rows([{"calls": None}], checks)["total"] is None  # a session from before the count: no rate
    person = take_home_block({"images": 8, "distinct": 7, "new": 5}, {"rounds": None, "final": None, "total": None})
    assert "new (no near-copy of a rated image): **5**" in person[1][1][1] and len(person[1][1]) == 2
