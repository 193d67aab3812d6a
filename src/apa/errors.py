"""Errors that tell a user what to do. The CLI prints their message without a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine. ``looked_at`` lists every path that was searched."""

    def __init__(self, what: str, looked_at: Iterable[str | Path], how_to_fix: str):
        self.what = what
        self.looked_at = [str(p) for p in looked_at]
        self.how_to_fix = how_to_fix
        lines = [f"{what}: no weights found. Looked at:"]
        lines += [f"  - {p}" for p in self.looked_at] or ["  (nowhere)"]
        lines.append(how_to_fix)
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # FileNotFoundError's own __str__ would print "[Errno ...]" noise
        return self.args[0]
