"""The package's design as checked contracts: what would let a newcomer get lost fails here.

- the layers (``[tool.importlinter]`` in pyproject.toml): no module imports one above it, inside
  functions included, and no cycle across them; a single upward import anywhere fails;
- no attribute is found by forwarding (``__getattr__``) and no capability by probing
  (``hasattr``/``getattr(..., None)``) without a comment on that line saying why.
"""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "apa"


def test_no_module_imports_one_above_it():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def lines_matching(pattern: str) -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return found


def test_no_attribute_is_forwarded():
    assert lines_matching(r"def __getattr__") == []


def test_every_probe_for_an_attribute_says_why():
    probes = lines_matching(r"getattr\(.*, None\)|hasattr\(")
    assert [line for line in probes if "#" not in line.split(":", 2)[2]] == []
