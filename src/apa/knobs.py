"""Configuration fields with their help sentence, and the checks that refuse a bad value.

Every option of `apa` is a ``knob`` on a frozen dataclass (``config.py``, and each backend's own
options, e.g. ``priors/sd_options.py``); the flag table (``flags.py``) is derived from them.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any


def knob(default: Any, help: str, *, flag: str | None = None, choices: Any = None, group: str | None = None) -> Any:
    """A config field with its help sentence; ``flag`` where the command-line name differs from the
    field's, ``choices`` (a tuple, or a registry whose names are the choices), ``group`` where the flag
    belongs with another backend's (e.g. "sd15") rather than with its section."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "group": group})


def require(ok: bool, message: str) -> None:
    """Refuse a setting: ``message`` says which flag was wrong and what it must be."""
    if not ok:
        raise ValueError(message)


def whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def at_least(flag: str, v: Any, low: int) -> None:
    require(whole(v) and v >= low, f"{flag} must be a whole number of at least {low}, got {v!r}")


def between(flag: str, v: Any, low: int, high: int) -> None:
    require(whole(v) and low <= v <= high, f"{flag} must be a whole number from {low} to {high}, got {v!r}")


def finite(flag: str, v: Any) -> None:
    require(number(v) and math.isfinite(v), f"{flag} must be a finite number, got {v!r}")


def choice(flag: str, v: Any, choices: tuple[str, ...]) -> None:
    require(v in choices, f"unknown {flag} {v!r}; choose one of {', '.join(choices)}")


def positive(flag: str, v: Any) -> None:
    require(number(v) and math.isfinite(v) and v > 0, f"{flag} must be a positive finite number, got {v!r}")


def non_negative(flag: str, v: Any) -> None:
    require(number(v) and math.isfinite(v) and v >= 0, f"{flag} must be a finite number from 0, got {v!r}")


def fraction(flag: str, v: Any) -> None:
    require(number(v) and 0.0 <= v <= 1.0, f"{flag} must be in [0, 1], got {v!r}")
