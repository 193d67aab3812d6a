"""Networks shipped in ``apa/weights``: one file format for all of them.

A shipped network is a safetensors file whose metadata holds its architecture config under one
key (``classifier`` for an oracle, ``judge`` for a judge), the dataset it was trained on and a JSON
record of its training (``info``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def shipped_path(name: str) -> Path:
    """Where a shipped file lives: ``apa/weights/<name>``."""
    return Path(str(resources.files("apa") / "weights" / name))


def export_network(model: nn.Module, path: Path, key: str, config: dict, dataset: str, info: dict) -> Path:
    """Write a network's weights as safetensors, its ``config`` under ``key`` in the metadata."""
    meta = {key: json.dumps(config), "dataset": dataset, "info": json.dumps(info)}
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return Path(path)


def network_metadata(path: Path, key: str) -> dict:
    """The decoded metadata of a shipped file: {key: config, "dataset": ..., "info": {...}}."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return {key: json.loads(meta[key]), "dataset": meta["dataset"], "info": json.loads(meta["info"])}
