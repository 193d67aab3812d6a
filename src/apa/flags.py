"""The command-line flags of an alignment session, derived from the fields of ``apa.config``.

Each field of the five config sections is one flag: its name is the field's (or the ``flag`` its
``knob`` names), its help sentence and choices are the field's, its default prints the way it is
typed (``2,8``, ``none``, ``true``). `apa align`, `apa serve` and `apa compare` build their
flags here; nothing here or in those commands imports ``apa.cli``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, Callable

from apa.config import AlignConfig, preset

SECTIONS = ("prior", "sampler", "surrogate", "feedback", "session")
GROUPS = {"prior": "prior (① the frozen diffusion model)", "sampler": "sampler (② FKC-SMC)",
          "surrogate": "surrogate (⑤ the reward r_θ refit each round)", "feedback": "feedback (④ who rates)",
          "session": "session (⑥ one user's loop)", "sd15": "Stable Diffusion 1.5 (--prior sd15)"}


@dataclass(frozen=True)
class Flag:
    """One flag: ``--name`` sets ``section.field``."""

    name: str
    section: str
    field: str
    help: str
    choices: tuple[str, ...] | None
    group: str
    type: str  # the field's annotation, e.g. "tuple[float, float]"
    default: Any

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def flag_table() -> list[Flag]:
    """Every flag of an alignment session, in the sections' order."""
    defaults = AlignConfig()
    out = []
    for section in SECTIONS:
        for f in fields(getattr(defaults, section)):
            meta = f.metadata
            choices = meta.get("choices")
            default = f.default if f.default is not MISSING else None
            out.append(Flag(meta.get("flag") or f.name, section, f.name, meta.get("help", ""),
                            tuple(choices) if choices is not None else None, meta.get("group") or section,
                            str(f.type), default))
    return out


def shown(value: Any) -> str:
    """A default the way a person types it: (2.0, 8.0) -> 2,8; None -> none; True -> true."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(shown(v) for v in value)
    return str(value) if value != "" else '""'


def shown_type(annotation: str) -> str:
    """What a flag's value looks like: "tuple[float, float]" -> A,B; "int" -> N."""
    return {"int": "N", "float": "X", "float | None": "X|none", "int | None": "N|none", "bool": "true|false",
            "bool | None": "true|false|none", "tuple[float, float]": "A,B", "tuple[int | str, ...]": "CLASS,CLASS,...",
            "tuple[str, ...] | None": "NAME,NAME,...", "tuple[int | str, ...] | None": "CLASS,...|none"}.get(annotation, "TEXT")


# ---------------------------------------------------------------- parsing the typed text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.5,2.0, got {text!r}")
    return parts[0], parts[1]


def _classes(text: str) -> tuple[int | str, ...]:
    """``--prefer``: class numbers or names, comma-separated (names are resolved against the dataset later)."""
    items = tuple(x.strip() for x in text.split(","))
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated classes like 1,4,7,9 or sandal,sneaker, "
                                         f"got {text!r}")
    return tuple(int(x) if x.lstrip("-").isdigit() else x for x in items)


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else _float(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _optional_bool(text: str) -> bool | None:
    return None if text.lower() == "none" else _bool(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else _int(text)


PARSERS: dict[str, Callable[[str], Any]] = {  # a field's annotation -> how its flag's text is read
    "int": _int, "float": _float, "str": str, "bool": _bool, "tuple[float, float]": _pair,
    "tuple[int | str, ...]": _classes, "tuple[int | str, ...] | None": lambda t: None if t.lower() == "none" else _classes(t), "tuple[str, ...] | None": _words, "float | None": _optional_float,
    "str | None": _optional_str, "int | None": _optional_int, "bool | None": _optional_bool}


def add_align_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, in argument groups; flags not given stay absent (SUPPRESS)."""
    groups: dict[str, Any] = {}
    for flag in flag_table():
        group = groups.get(flag.group) or groups.setdefault(flag.group, p.add_argument_group(GROUPS[flag.group]))
        group.add_argument(flag.option, dest=flag.name, type=PARSERS[flag.type], default=argparse.SUPPRESS,
                           metavar="{" + ",".join(flag.choices) + "}" if flag.choices else shown_type(flag.type),
                           help=f"{flag.help} (default: {shown(flag.default)})")


def config_from_args(args: argparse.Namespace) -> AlignConfig:
    """The whole configuration the flags give; each section checks its fields as it is built (ValueError)."""
    cfg = preset(getattr(args, "preset", None) or "default")  # a flag is absent unless given
    given = vars(args)  # flags not given are absent (SUPPRESS), so "--clamp none" can set None
    updates: dict[str, dict] = {}
    for flag in flag_table():
        if flag.name in given:
            updates.setdefault(flag.section, {})[flag.field] = given[flag.name]
    return replace(cfg, **{s: replace(getattr(cfg, s), **v) for s, v in updates.items()})


def given_flags(args: argparse.Namespace) -> list[str]:
    """The alignment flags given on this command line, as options (``--budget``)."""
    given = vars(args)
    return [f.option for f in flag_table() if f.name in given]
