"""The flags of an alignment session, derived from the config's fields."""

import ast
import dataclasses
from pathlib import Path

import pytest

from apa.cli import build_parser
from apa.config import AlignConfig
from apa.flags import SECTIONS, config_from_args, flag_table, shown

SRC = Path(__file__).resolve().parents[1] / "src" / "apa"


def test_every_config_field_has_exactly_one_flag_with_a_help_sentence():
    table = flag_table()
    fields = {(s, f.name) for s in SECTIONS for f in dataclasses.fields(getattr(AlignConfig(), s))}
    assert {(f.section, f.field) for f in table} == fields
    assert len({f.name for f in table}) == len(table)
    assert all(len(f.help) > 10 for f in table), [f.name for f in table if len(f.help) <= 10]


def test_flags_map_to_fields():
    args = build_parser().parse_args(["align", "--out", "x", "--beta", "1,4", "--prefer", "0", "--clamp", "none",
                                      "--diversity", "true", "--surrogate", "pixels", "--preset", "seed"])
    cfg = config_from_args(args)
    assert cfg.sampler.beta == (1.0, 4.0) and cfg.feedback.prefer == (0,) and cfg.sampler.clamp is None
    assert cfg.sampler.diversity is True and cfg.surrogate.kind == "pixels"
    assert cfg.sampler.resample == "none"  # the rest of the seed preset stays


def test_defaults_print_the_way_they_are_typed():
    assert (shown((2.0, 8.0)), shown(None), shown(True), shown(1e-3), shown((1, 4, 7, 9))) == (
        "2,8", "none", "true", "0.001", "1,4,7,9")


@pytest.mark.parametrize("flag, choices", [
    ("--prior", "mnist,fashion,gmm,sd15"), ("--feedback", "oracle,clip,imagenet,human"),
    ("--surrogate", "features,pixels"), ("--reward-at", "xt,tweedie"), ("--jacobian", "exact,gaussian,identity"),
    ("--weights", "exact,rate,none"), ("--resample", "systematic,stratified,residual,multinomial,none"),
    ("--acquisition", "diverse,weight,random,ucb"), ("--mode", "binary,graded"), ("--final-start", "noise,liked,balanced"),
    ("--init", "noise,prompt")])
def test_help_lists_the_choices_of_every_enumerated_flag(flag, choices, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "--help"])
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.strip().startswith(flag + " "))
    listed = line[line.index("{") + 1:line.index("}")].split(",")
    assert listed[:len(choices.split(","))] == choices.split(",")  # the built-in choices (tests may register more)


def test_help_groups_the_flags_and_sets_the_sd_flags_apart(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "--help"])
    text = capsys.readouterr().out
    for title in ("sampler (② FKC-SMC)", "surrogate (", "feedback (", "session (", "Stable Diffusion 1.5 (--prior sd15)"):
        assert title in text, title
    sd = text[text.index("Stable Diffusion 1.5 (--prior sd15)"):]
    assert "--guidance-scale" in sd and "--prompt" in sd and "(default: 0,2)" in text


def test_version(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("apa ")


def test_no_module_imports_the_cli():
    """The layering runs one way: the CLI calls the modules, no module of the package imports it."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(SRC)}: {n}" for n in names if n == "apa.cli" or n.startswith("apa.cli.")]
    assert offenders == []


def test_prefer_takes_class_numbers_or_names():
    args = build_parser().parse_args(["align", "--out", "x", "--prefer", "sandal, 7,ankle-boot"])
    assert config_from_args(args).feedback.prefer == ("sandal", 7, "ankle-boot")
