"""Small name -> factory registries that drive the CLI's choices (``--prior``, ``--feedback``).

A prior factory takes the prior options (a dict, see ``config.PriorConfig``) and returns a
``Prior``; a feedback factory takes the feedback options and the prior and returns a
``FeedbackSource``. Backends register themselves when their module is imported; the modules
listed in ``_BUILTIN`` are imported on first lookup, so optional dependencies load only when used.
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
        return sorted(set(self._factories) | set(self._builtin))

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories and name in self._builtin:
            importlib.import_module(self._builtin[name])
        if name not in self._factories:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._factories[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)


PRIORS = Registry("prior", {"mnist": "apa.priors.ddpm", "fashion": "apa.priors.ddpm", "gmm": "apa.priors.gmm",
                            "sd15": "apa.priors.stable_diffusion"})
FEEDBACK = Registry("feedback", {"oracle": "apa.feedback.oracle", "clip": "apa.feedback.clip",
                                 "imagenet": "apa.feedback.imagenet", "human": "apa.feedback.human"})
