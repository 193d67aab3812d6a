"""Small name -> factory registries, one style for every pluggable part; they drive the CLI's choices.

A prior factory takes the prior options (a dict, see ``config.PriorConfig``) and returns a
``Prior``; a feedback factory takes the feedback options and the prior and returns a
``FeedbackSource``; an acquisition rule is ``(Candidates, k, generator) -> indices``; a
resampling scheme ``(generator, log_weights, n) -> ancestors``; a comparison method is the run
function of ``apa.baselines.common``'s signature, registered with its settings (a :class:`Method`).
Each registers itself when its module is imported (refusing a second, different factory under a
name); the modules named here are imported on first lookup, so optional dependencies load only
when used, and ``names()`` lists every choice without importing anything.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping


class Registry:
    def __init__(self, kind: str, builtin: dict[str, str]):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._builtin = builtin  # name -> module that registers it

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories and self._factories[name] is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        """Every registered name: the built-in ones in their listed order, then any others, sorted."""
        return list(self._builtin) + sorted(set(self._factories) - set(self._builtin))

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories and name in self._builtin:
            importlib.import_module(self._builtin[name])
        if name not in self._factories:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._factories[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._factories or name in self._builtin

    def __iter__(self):
        return iter(self.names())


@dataclass(frozen=True)
class Method:
    """A method of `apa compare`: its run function, its settings and the comparison's settings it takes.

    ``config`` is the settings' frozen dataclass (its defaults) or a default instance of it (EPAPA is
    PAPA's class with another ``k``); None for a method with no settings. ``compare`` maps a field of
    it (``section.field`` inside a nested config such as ``AlignConfig``) to the `apa compare` setting
    (a ``CompareConfig`` field) that sets it; every other field keeps the method's default.
    """

    run: Callable[..., Any]
    config: Any = None
    compare: Mapping[str, str] = field(default_factory=dict)

    def defaults(self) -> Any:
        """The method's own settings (None when it has none)."""
        return self.config() if isinstance(self.config, type) else self.config

    def settings(self, values: Mapping[str, Any]) -> Any:
        """The settings the method runs with under a comparison whose settings are ``values`` (by name)."""
        missing = sorted(set(self.compare.values()) - set(values))
        if missing:
            raise ValueError(f"the method's settings take {', '.join(missing)}, which the comparison does not set")
        base = self.defaults()
        return None if base is None else _replaced(base, {path: values[name] for path, name in self.compare.items()})


def _field_of(config: Any, path: str) -> Any:
    """The value at ``field`` or ``section.field`` of a dataclass; ValueError naming a missing field."""
    head, _, rest = path.partition(".")
    if head not in {f.name for f in fields(config)}:
        raise ValueError(f"{type(config).__name__} has no field {head!r}")
    return _field_of(getattr(config, head), rest) if rest else getattr(config, head)


def _replaced(config: Any, changes: Mapping[str, Any]) -> Any:
    """A copy of a frozen dataclass with fields replaced, ``section.field`` reaching into a nested one."""
    nested: dict[str, dict[str, Any]] = {}
    flat = {}
    for path, value in changes.items():
        _field_of(config, path)
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    flat.update({head: _replaced(getattr(config, head), sub) for head, sub in nested.items()})
    return replace(config, **flat)


class MethodRegistry(Registry):
    """The comparison's methods: a run function under a name, registered with its settings in one call.

        @METHODS.register("best_of_n", config=BestOfNConfig, compare={"steps": "steps", "refine_t": "refine_t"})
        def run(prior, user, budget, per_round, seed, *, config=None, checkpoints=(), eval_samples=64, workdir=None):
    """

    def __init__(self, kind: str, builtin: dict[str, str]):
        super().__init__(kind, builtin)
        self._methods: dict[str, Method] = {}

    def register(self, name: str, *, config: Any = None,
                 compare: Mapping[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a run function under ``name`` with its settings (see :class:`Method`). The same run
        function registered again may declare settings a first registration left out, never change them."""

        def deco(run: Callable[..., Any]) -> Callable[..., Any]:
            method = Method(run, config, dict(compare or {}))
            if method.compare and config is None:
                raise ValueError(f"{self.kind} {name!r} takes comparison settings but declares no config")
            for path in method.compare:
                _field_of(method.defaults(), path)  # a misspelt field fails here, when its module loads
            before = self._methods.get(name)
            if before is not None and None not in (before.config, config) and method != before:
                raise ValueError(f"{self.kind} {name!r} is already registered with other settings")
            Registry.register(self, name)(run)  # refuses another run function under the name
            if before is None or config is not None:
                self._methods[name] = method
            return run

        return deco

    def method(self, name: str) -> Method:
        """The run function and settings registered under ``name`` (its module imported first)."""
        if name in self._builtin:  # the module that registers it, and declares its settings
            importlib.import_module(self._builtin[name])
        self.get(name)
        return self._methods[name]


PRIORS = Registry("prior", {"mnist": "apa.priors.ddpm", "fashion": "apa.priors.ddpm", "gmm": "apa.priors.gmm",
                            "sd15": "apa.priors.stable_diffusion"})
FEEDBACK = Registry("feedback", {"oracle": "apa.feedback.oracle", "clip": "apa.feedback.clip",
                                 "imagenet": "apa.feedback.imagenet", "human": "apa.feedback.human"})
ACQUISITIONS = Registry("acquisition", {name: "apa.session.acquisition" for name in ("diverse", "weight", "random", "ucb")})
RESAMPLERS = Registry("resampling scheme", {name: "apa.smc.resampling"
                                            for name in ("systematic", "stratified", "residual", "multinomial")})
METHODS = MethodRegistry("method", {
    "fkc": "apa.baselines.fkc",
    "papa": "apa.baselines.papa", "epapa": "apa.baselines.papa", "best_of_n": "apa.baselines.best_of_n",
    "best_of_m": "apa.baselines.best_of_m", "best_of_m_is": "apa.baselines.best_of_m",
    "guidance": "apa.baselines.guidance", "prior": "apa.baselines.prior", "fk_steering": "apa.baselines.fk_steering",
    "das_online": "apa.baselines.das_online", "seiko_ucb": "apa.baselines.seiko_ucb"})
