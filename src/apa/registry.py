"""Small name -> factory registries, one style for every pluggable part; they drive the CLI's choices.

A prior factory takes the prior options (a dict, see ``config.PriorConfig``) and returns a
``Prior``; a feedback factory takes the feedback options and the prior and returns a
``FeedbackSource``; an acquisition rule is ``(Candidates, k, generator) -> indices``; a
resampling scheme ``(generator, log_weights, n) -> ancestors``; a comparison method is the run
function of ``apa.baselines.common``'s signature. Each registers itself when its module is
imported (refusing a second, different factory under a name); the modules named here are
imported on first lookup, so optional dependencies load only when used, and ``names()`` lists
every choice without importing anything.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


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


PRIORS = Registry("prior", {"mnist": "apa.priors.ddpm", "fashion": "apa.priors.ddpm", "gmm": "apa.priors.gmm",
                            "sd15": "apa.priors.stable_diffusion"})
FEEDBACK = Registry("feedback", {"oracle": "apa.feedback.oracle", "clip": "apa.feedback.clip",
                                 "imagenet": "apa.feedback.imagenet", "human": "apa.feedback.human"})
ACQUISITIONS = Registry("acquisition", {name: "apa.session.acquisition" for name in ("diverse", "weight", "random", "ucb")})
RESAMPLERS = Registry("resampling scheme", {name: "apa.smc.resampling"
                                            for name in ("systematic", "stratified", "residual", "multinomial")})
METHODS = Registry("method", {"fkc": "apa.baselines.fkc", "papa": "apa.baselines.papa", "epapa": "apa.baselines.papa",
                              "best_of_n": "apa.baselines.best_of_n", "best_of_m": "apa.baselines.best_of_m",
                              "best_of_m_is": "apa.baselines.best_of_m", "guidance": "apa.baselines.guidance",
                              "prior": "apa.baselines.prior", "fk_steering": "apa.baselines.fk_steering",
                              "das_online": "apa.baselines.das_online", "seiko_ucb": "apa.baselines.seiko_ucb"})
