"""What `apa align` prints: a progress line per round and a closing summary with the final share."""

import json

from apa.cli import main
from apa.evaluation.summary import closing_summary, round_postfix, summary_lines

TINY = ["--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "6", "--eval-samples", "8",
        "--epochs", "10", "--seed", "3"]


def test_round_postfix_names_the_round_share_rating_ess_and_heldout_score():
    row = {"info": {"eval": {"preferred_confident_share": 0.8412}, "ess": [32.0, 9.14, 20.0],
                    "surrogate_heldout": {"accuracy": 0.875, "mae": 0.3, "n": 8}}}
    ratings = [{"score": 1.0}, {"score": -1.0}, {"score": 1.0}, {"score": None}]
    assert round_postfix(2, 10, row, ratings) == (
        "round 3/10 · preferred 0.84 · mean rating +0.33 · min ESS 9.1 · held-out acc 0.88")
    assert round_postfix(0, 10, {"info": {}}, []) == "round 1/10"


def test_summary_lines_compare_with_the_prior_and_warn_of_collapse():
    report = {"rounds": [{"ratings": [1.0, -1.0, None]}],
              "final": {"preferred_confident_share": 0.91, "confident_share": 0.95,
                        "preferred_class_shares": {"3": 0.95, "8": 0.05}},
              "prior_baseline": {"preferred_confident_share": 0.18},
              "collapse_warning": "collapse warning: class 8 at 5% of the preferred samples"}
    lines = summary_lines(closing_summary(report, 42.4, "runs/x/report.md"))
    assert lines[0] == "session complete: 2 ratings in 42 s"
    assert lines[1] == "final batch: 0.91 preferred and confident (the prior alone: 0.18); 0.95 confident"
    assert "preferred classes: 3 95%, 8 5%" in lines and lines[-2].startswith("collapse warning")
    assert lines[-1] == "report: runs/x/report.md"


def test_align_prints_a_line_per_round_and_a_closing_summary(tmp_path, capsys):
    assert main(["align", "--out", str(tmp_path / "s"), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "round 1/2" in err and "round 2/2" in err  # the progress bar's postfix, once per round
    assert "session complete: 8 ratings" in out and "preferred and confident" in out
    assert f"report: {tmp_path / 's' / 'report.md'}" in out
    # what the person takes home, and what it cost: 2 rounds of 8 particles and 8 final images, 6 steps each,
    # so at least 2·8·6 + 8·6 = 144 ε rows (features and gradients come on top once a surrogate is fitted)
    home = next(line for line in out.splitlines() if line.startswith("take home: "))
    calls = json.loads((tmp_path / "s" / "report.json").read_text())["calls"]
    assert calls["total"] == calls["rounds"] + calls["final"] and calls["total"] >= 144
    assert f"{calls['total']:,} network-call rows" in home
    assert "## What you take home" in (tmp_path / "s" / "report.md").read_text()


def test_align_json_prints_only_the_summary(tmp_path, capsys):
    assert main(["align", "--out", str(tmp_path / "s"), "--json", *TINY]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["ratings"] == 8 and 0.0 <= summary["preferred_confident"] <= 1.0
    assert "round 1/2" not in err


def test_the_summary_says_what_share_of_the_shown_images_was_liked_and_how_many_final_images_copy():
    from apa.evaluation.summary import closing_summary, summary_lines

    report = {"rounds": [{"ratings": [1.0, -1.0], "liked_share": 0.5}, {"ratings": [1.0], "liked_share": 1.0},
                         {"ratings": [None], "liked_share": None}],
              "final": {}, "final_checks": {"near_copy_share": 0.04}}
    lines = summary_lines(closing_summary(report, 12.0, "r/report.md"))
    assert "shown images liked: 0.75; final images that copy a liked rated one: 4% (the prior's own: 5%)" in lines
