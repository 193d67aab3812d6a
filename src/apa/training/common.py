"""A seeded, resumable training loop shared by the built-in prior, oracle and judge.

The loop checkpoints model, EMA copy, optimiser, step and random state to ``<run_dir>/ckpt.pt``
every ``checkpoint_every`` steps (atomically), appends ``step,loss,seconds`` to
``<run_dir>/loss.csv``, and on restart continues from the last checkpoint: an interrupted run
loses at most ``checkpoint_every`` steps.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from apa.atomic import write_file


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8000  # optimiser steps in all
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate after warm-up
    warmup: int = 200  # linear warm-up steps
    ema_decay: float = 0.999  # exponential moving average of the weights (what ships)
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    max_minutes: float | None = None  # stop (after checkpointing) when this wall time is spent
    device: str = "cpu"  # where the network trains; batches are drawn on the CPU either way


LossFn = Callable[[nn.Module, torch.Generator], torch.Tensor]


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file(path, buffer.getvalue(), mode=0o644)


def train(model: nn.Module, loss_fn: LossFn, config: TrainConfig, run_dir: Path, progress: bool = True) -> nn.Module:
    """Minimise ``loss_fn(model, generator)`` (one batch per call); returns the EMA model.

    Resumes from ``run_dir/ckpt.pt`` when present. ``loss_fn`` draws its batch with the
    generator it is given (a CPU generator, whatever ``config.device``), so a resumed run draws
    the same batches as an uninterrupted one, and a run on a GPU the same batches as on the CPU.
    The returned EMA network is on the CPU.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "ckpt.pt", run_dir / "loss.csv"
    model.to(config.device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    ema = copy.deepcopy(model).requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location=config.device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"].cpu())
        step, elapsed = state["step"], state["elapsed"]

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                     "generator": gen.get_state(), "step": step, "elapsed": elapsed})

    start = time.perf_counter() - elapsed
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc=f"train {run_dir.name}")
    with open(log_path, "a", newline="") as log:
        writer = csv.writer(log)
        while step < config.steps:
            for group in opt.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
            loss = loss_fn(model, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))  # warm-up: forget the random init fast
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
            step += 1
            elapsed = time.perf_counter() - start
            writer.writerow([step, f"{loss.item():.6f}", f"{elapsed:.1f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            out_of_time = config.max_minutes is not None and elapsed > 60 * config.max_minutes
            if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
                checkpoint()
                log.flush()
            if out_of_time:
                break
    bar.close()
    return ema.cpu()


def load_checkpoint_model(model: nn.Module, run_dir: Path, ema: bool = True) -> tuple[nn.Module, dict]:
    """Load a run's latest (EMA) weights into ``model``; returns (model, {step, elapsed})."""
    state = torch.load(Path(run_dir) / "ckpt.pt", weights_only=False, map_location="cpu")
    model.load_state_dict(state["ema" if ema else "model"])
    return model, {"step": state["step"], "elapsed": state["elapsed"]}
