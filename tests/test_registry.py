"""Registries: one name, one factory; a comparison method carries its settings and the comparison's it takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from apa.knobs import at_least, knob
from apa.registry import Method, MethodRegistry, Registry


@dataclass(frozen=True)
class Inner:
    steps: int = knob(25, "steps")
    lr: float = knob(1e-3, "learning rate")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    seed: int = knob(0, "seed")

    def __post_init__(self) -> None:
        at_least("seed", self.seed, 0)


def run(prior, user, budget, per_round, seed, *, config=None, checkpoints=(), eval_samples=64, workdir=None):
    return config


def other_run(prior, user, budget, per_round, seed, *, config=None, checkpoints=(), eval_samples=64, workdir=None):
    return config


def test_a_name_refuses_a_second_factory_and_unknown_names_list_the_choices():
    reg = Registry("thing", {"a": "apa.nowhere"})
    reg.register("b")(run)
    reg.register("b")(run)  # the same factory again: a module imported twice
    with pytest.raises(ValueError, match="already registered"):
        reg.register("b")(other_run)
    assert reg.names() == ["a", "b"] and "a" in reg
    with pytest.raises(KeyError, match="choose one of a, b"):
        reg.get("c")


def test_a_method_takes_the_comparisons_settings_it_names_and_keeps_its_other_defaults():
    methods = MethodRegistry("method", {})
    methods.register("m", config=Outer, compare={"inner.steps": "steps", "seed": "seed"})(run)
    got = methods.method("m").settings({"steps": 3, "seed": 7, "particles": 99})
    assert got == Outer(Inner(steps=3), seed=7)
    with pytest.raises(ValueError, match="seed"):  # the fields' own checks run
        methods.method("m").settings({"steps": 3, "seed": -1})
    with pytest.raises(ValueError, match="does not set"):
        methods.method("m").settings({"steps": 3})
    assert methods.get("m") is run


def test_a_default_instance_is_the_methods_settings_and_none_means_no_settings():
    methods = MethodRegistry("method", {})
    methods.register("fast", config=Inner(lr=0.5), compare={"steps": "steps"})(run)
    methods.register("plain")(other_run)
    assert methods.method("fast").settings({"steps": 4}) == Inner(steps=4, lr=0.5)
    assert methods.method("plain").settings({"steps": 4}) is None


def test_misdeclared_settings_fail_at_registration():
    methods = MethodRegistry("method", {})
    with pytest.raises(ValueError, match="no field 'stepz'"):
        methods.register("m", config=Inner, compare={"stepz": "steps"})(run)
    with pytest.raises(ValueError, match="no field 'nope'"):
        methods.register("m", config=Outer, compare={"inner.nope": "steps"})(run)
    with pytest.raises(ValueError, match="declares no config"):
        methods.register("m", compare={"steps": "steps"})(run)


def test_a_second_registration_may_add_settings_but_not_change_them():
    methods = MethodRegistry("method", {})
    methods.register("m")(run)
    methods.register("m", config=Inner, compare={"steps": "steps"})(run)
    methods.register("m")(run)  # a later plain registration keeps them
    assert methods.method("m") == Method(run, Inner, {"steps": "steps"})
    with pytest.raises(ValueError, match="other settings"):
        methods.register("m", config=Outer)(run)
    with pytest.raises(ValueError, match="already registered"):
        methods.register("m", config=Inner, compare={"steps": "steps"})(other_run)
