"""Import-time fixes for the optional image stack (diffusers, transformers, open_clip).

torchvision from PyPI is a CUDA build. Next to a CPU-only torch its compiled extension
(``torchvision/_C.so``) cannot load, so the operators it would define (``torchvision::nms``,
``torchvision::qnms``) do not exist, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py`` with "operator torchvision::nms does not exist".
diffusers, transformers and open_clip import torchvision whenever it is installed, so all of
them fail with it.

:func:`ensure_torchvision` declares the schemas of those operators before torchvision is
imported, which is all ``_meta_registrations`` needs; nothing apa uses calls them (calling one
would raise "no kernel"). Where the extension does load (a matching torchvision build), the
function leaves everything untouched. Call it at the top of every module that imports
diffusers, transformers or open_clip; it is idempotent.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# The operators torchvision registers fake (meta) kernels for unconditionally at import time.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would undefine the schemas


def _extension_loads(package_dir: Path) -> bool:
    """Whether torchvision's compiled operators load next to this torch (loading them if so)."""
    for lib in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, ImportError, RuntimeError):
            return False
    return False


def _operator_exists(name: str) -> bool:
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", "CPU")
        return True
    except RuntimeError:
        return False


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work next to a CPU-only torch. Returns True if schemas were declared.

    Does nothing when torchvision is not installed, is already imported, or its extension loads.
    """
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return False
    missing = [s for s in _SCHEMAS if not _operator_exists(s.split("(", 1)[0])]
    if not missing:
        return False
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        _LIBRARY.define(schema)
    return True
