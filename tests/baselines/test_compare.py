"""`apa compare` end to end on a tiny prior, budget and evaluation batch."""

import argparse
import json

import pytest

from apa.cli import main
from apa.evaluation.compare import parse_budgets
from apa.evaluation.compare_report import budgets_text
from apa.priors.ddpm import export_prior

from .conftest import tiny_unet


def test_budget_lists_and_progressions():
    assert parse_budgets("8,16,...,80") == tuple(range(8, 81, 8))
    assert parse_budgets("4, 8,16") == (4, 8, 16)
    assert budgets_text(list(range(8, 81, 8))) == "8,16,...,80"
    for bad in ("8,...,80", "0,8", "a,b", "16,8,...,80"):
        with pytest.raises(argparse.ArgumentTypeError, match="budgets"):
            parse_budgets(bad)


def test_compare_runs_every_method_and_writes_its_outputs(tmp_path, mnist_arrays, capsys):
    weights = export_prior(tiny_unet(), tmp_path / "tiny.safetensors", "mnist", 0.6, {})
    out = tmp_path / "cmp"
    args = ["compare", "--prior-weights", str(weights), "--prefer", "1,4,7,9", "--budgets", "2,4", "--seeds", "2",
            "--per-round", "2", "--eval-samples", "4", "--particles", "4", "--steps", "2", "--papa-timesteps", "2",
            "--epochs", "5", "--threads", "1", "--yardstick", "64", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["methods"]) == {"fkc", "papa", "epapa", "best_of_n", "best_of_m", "guidance", "prior"}
    for name, s in summary["methods"].items():
        assert set(s["by_budget"]) == {"2", "4"} and s["seeds"] == [0, 1], name
        assert s["oracle_ratings"]["mean"] == (0 if name == "prior" else 4), name
        share = s["by_budget"]["4"]["preferred_confident_share"]
        assert 0.0 <= share["min"] <= share["mean"] <= share["max"] <= 1.0
        home = s["by_budget"]["4"]
        assert 0 <= home["yield"]["max"] <= home["distinct"]["max"] <= 4, name
        assert home["calls"]["min"] > 0 and home["calls"]["min"] == home["calls"]["max"], name  # seeds cost alike
    calls = {name: s["by_budget"]["4"]["calls"]["mean"] for name, s in summary["methods"].items()}
    assert calls["prior"] == 4 * 2  # 4 plain samples of 2 steps: one ε row each per step
    assert calls["fkc"] > calls["best_of_n"]  # steering reads features and their gradient beside ε
    # best-of-M: its 4 rated samples of 2 ε steps; two fits (at 2 and 4 ratings) reading the features of
    # the rated images and one probe row each; then its pool at equal calls to the default final batch
    # (89 rows an image over 3 rows a sample: 119 samples for 4 images), 2 ε rows and one features row each
    assert calls["best_of_m"] == 4 * 2 + (2 + 1) + (4 + 1) + 119 * 3
    assert summary["real"]["preferred_share"] > 0.9
    md = (out / "compare.md").read_text()
    assert "| fkc | 4 |" in md and "apa compare --prior mnist" in md and "yield per 1,000 rows" in md
    for png in ("share_vs_feedback.png", "diversity.png", "fd_vs_feedback.png", "cost.png", "grids/fkc.png"):
        assert (out / png).stat().st_size > 0, png
    capsys.readouterr()
    assert main(args) == 0  # the second call loads every cached run
    assert json.loads((out / "compare.json").read_text())["runs"] == summary["runs"]


def test_every_method_declares_its_settings_where_it_registers():
    """One place per method: its module registers the run function with its settings (knobs with a help
    sentence) and the comparison settings it takes; the registry's index names exactly those modules."""
    import importlib
    import pkgutil
    from dataclasses import fields

    from apa import baselines
    from apa.config import AlignConfig
    from apa.evaluation.compare import CompareConfig
    from apa.registry import METHODS

    for module in pkgutil.iter_modules(baselines.__path__):
        importlib.import_module(f"apa.baselines.{module.name}")
    assert set(METHODS._factories) == set(METHODS.names())  # nothing registered outside the index
    settings = {f.name for f in fields(CompareConfig)}
    for name in METHODS.names():
        method = METHODS.method(name)
        config = method.defaults()
        assert config is not None and set(method.compare.values()) <= settings, name
        if not isinstance(config, AlignConfig):  # the session's sections are config.py's, checked there
            assert all(f.metadata.get("help") for f in fields(config)), name


def test_method_settings_follow_the_comparison():
    from apa.baselines.papa import EPAPA, PAPAConfig
    from apa.evaluation.compare import CompareConfig, method_config

    cc = CompareConfig(out="x", steps=4, particles=8, epochs=3, prefer=(2, 5), papa_lr=2e-5, papa_timesteps=7,
                       refine_t=100)
    papa = PAPAConfig(lr=2e-5, timesteps_per_image=7, sample_steps=4)
    assert method_config(cc, "papa") == papa and method_config(cc, "papa@300") == papa
    assert method_config(cc, "epapa") == PAPAConfig(k=EPAPA.k, lr=2e-5, timesteps_per_image=7, sample_steps=4)
    assert (method_config(cc, "best_of_n").steps, method_config(cc, "best_of_n").refine_t) == (4, 100)
    for name in ("fkc", "guidance"):
        session = method_config(cc, name)
        assert (session.sampler.particles, session.sampler.steps, session.surrogate.epochs) == (8, 4, 3), name
        assert session.feedback.prefer == (2, 5) and session.prior.name == "mnist", name


def test_compare_runs_the_fields_methods_beside_apa(tmp_path, mnist_arrays):
    """`apa compare --methods fkc,fk_steering,das_online,seiko_ucb,best_of_n,papa`: each peer spends the
    same budget in the same rounds and gets its own settings at the comparison's step count."""
    from apa.baselines.best_of_m import BestOfMConfig
    from apa.baselines.das_online import DASOnlineConfig
    from apa.baselines.fk_steering import FKSteeringConfig
    from apa.baselines.seiko_ucb import SEIKOConfig
    from apa.evaluation.compare import CompareConfig, method_config

    cc = CompareConfig(out=str(tmp_path), steps=3)
    assert method_config(cc, "fk_steering") == FKSteeringConfig(steps=3)
    assert method_config(cc, "das_online") == DASOnlineConfig(steps=3)
    assert method_config(cc, "seiko_ucb") == SEIKOConfig(steps=3)
    assert method_config(cc, "best_of_m") == BestOfMConfig(steps=3)
    weights = export_prior(tiny_unet(), tmp_path / "tiny.safetensors", "mnist", 0.6, {})
    out = tmp_path / "cmp"
    methods = "fkc,fk_steering,das_online,seiko_ucb,best_of_n,papa"
    assert main(["compare", "--prior-weights", str(weights), "--budgets", "2,4", "--seeds", "1", "--per-round", "2",
                 "--eval-samples", "4", "--particles", "4", "--steps", "3", "--papa-timesteps", "2", "--epochs", "5",
                 "--threads", "1", "--yardstick", "64", "--methods", methods, "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["methods"]) == set(methods.split(","))
    for name, s in summary["methods"].items():
        assert s["oracle_ratings"]["mean"] == 4 and set(s["by_budget"]) == {"2", "4"}, name
