"""How the built-in DDPM prior is trained: the ε-MSE loss, the run, the export.

PAPA's recipe: ε-prediction on a uniform timestep of the 1000-step linear-β schedule
(``apa.priors.ddpm``), images scaled to [-1, 1], the loop of ``apa.training.common``. `apa
train-prior` runs :func:`train_prior` then :func:`export_from_run`, which writes
``apa/weights/ddpm_<dataset>.safetensors`` (``apa.priors.ddpm.export_prior``: the file
``load_prior`` reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apa import data as data_mod
from apa.priors.ddpm import NUM_TRAIN_TIMESTEPS, alphas_cumprod, export_prior, weights_path
from apa.priors.unet import UNet, UNetConfig
from apa.training.common import TrainConfig, load_checkpoint_model, train


def diffusion_loss(images: torch.Tensor, batch_size: int):
    """The DDPM ε-MSE on a uniform timestep; images float32 [n, 1, 28, 28] in [-1, 1]."""
    acp = alphas_cumprod().float()

    def loss_fn(model: UNet, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0 = images[idx]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        dev = next(model.parameters()).device  # drawn on the CPU, trained wherever the model is
        return (model(xt.to(dev), t.float().to(dev)) - noise.to(dev)).pow(2).mean()

    return loss_fn


def train_prior(dataset: str, run_dir: Path, config: TrainConfig = TrainConfig(),
                unet: UNetConfig = UNetConfig(), progress: bool = True, limit: int | None = None) -> UNet:
    """Train (or resume) the ε-UNet on a dataset's training split; returns the EMA network."""
    torch.manual_seed(config.seed)
    arrays = data_mod.load(dataset)
    images = torch.from_numpy(data_mod.to_unit(arrays["train_images"][:limit])) * 2 - 1
    model = UNet(unet)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "unet.json").write_text(json.dumps(unet.to_dict()))
    return train(model, diffusion_loss(images, config.batch_size), config, run_dir, progress=progress)


# ---------------------------------------------------------------- shipping


def data_std_of(dataset: str) -> float:
    """Per-pixel std of the training images in [-1, 1] units."""
    x = data_mod.to_unit(data_mod.load(dataset)["train_images"]) * 2 - 1
    return float(x.std())


def export_from_run(dataset: str, run_dir: Path, path: Path | None = None) -> Path:
    """Export a training run's EMA weights as the dataset's shipped prior."""
    cfg_path = Path(run_dir) / "unet.json"
    unet_cfg = UNetConfig.from_dict(json.loads(cfg_path.read_text())) if cfg_path.exists() else UNetConfig()
    model, info = load_checkpoint_model(UNet(unet_cfg), run_dir)
    return export_prior(model, path or weights_path(dataset), dataset, data_std_of(dataset), info)

