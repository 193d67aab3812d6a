"""The built-in pixel-space DDPM prior (1x28x28 MNIST / Fashion-MNIST): schedule, model, loading.

The network is trained as PAPA's is (``apa.training.ddpm``): ε-prediction, 1000 steps, linear β
from 1e-4 to 0.02, images scaled to [-1, 1]. Sampling uses a respacing of those 1000 steps (25 by
default) in VE form (see ``priors/base.py``): z = x/√ᾱ_t, σ_t² = (1 − ᾱ_t)/ᾱ_t, the network called on
x = z/√(1+σ²). The shipped weights live in ``apa/weights/ddpm_<dataset>.safetensors`` with their
config in the file's metadata (written by :func:`export_prior`, read by :func:`load_prior`);
nothing is downloaded.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import SafetensorError, safe_open

from apa import data as data_mod
from apa.priors.base import VEPrior
from apa.priors.unet import UNet, UNetConfig
from apa.registry import PRIORS
from apa.types import Particles

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # PAPA's linear schedule
# The network's weights (and so its activations) in channels-last memory: oneDNN's convolutions run
# faster on it on the CPU (benchmarks/memory_format.py); a row's result does not depend on
# the rows beside it in either format.
MEMORY_FORMAT = torch.channels_last


def alphas_cumprod(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 of the linear-β schedule, float64 [T]."""
    betas = torch.linspace(BETA_START, BETA_END, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def respaced_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``num_steps`` evenly spaced training timesteps from T-1 down to 0, int64 [num_steps]."""
    return torch.linspace(num_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long()


class DDPMPrior(VEPrior):
    """A trained ε-UNet in VE form. Particles z [N, 1, 28, 28] in data units (x0 ∈ [-1, 1])."""

    def __init__(self, model: UNet, data_std: float = 0.6, name: str = "ddpm", class_names: tuple[str, ...] = ()):
        self.model = model.eval().requires_grad_(False).to(memory_format=MEMORY_FORMAT)
        self.event_shape = (model.config.in_channels, 28, 28)
        self.data_std = float(data_std)
        self.name = name
        self.class_names = class_names
        acp = alphas_cumprod()
        self._log_sigma_table = (0.5 * torch.log((1 - acp) / acp)).float()  # log σ_t, increasing in t

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_sigma_table[t.long()])

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """σ at the respaced timesteps, then 0: [num_steps + 1]."""
        return torch.cat([self.sigma_of_t(respaced_timesteps(num_steps)), torch.zeros(1)])

    def timestep_of_sigma(self, sigma: float) -> float:
        """The (fractional) training timestep whose σ is ``sigma``, by interpolation in log σ."""
        table = self._log_sigma_table
        ls = torch.tensor(float(np.log(sigma)), dtype=table.dtype)
        idx = int(torch.searchsorted(table, ls).clamp(1, len(table) - 1))
        lo, hi = table[idx - 1], table[idx]
        frac = float(((ls - lo) / (hi - lo)).clamp(0.0, 1.0))
        return idx - 1 + frac

    def sample_initial(self, n: int, sigma: float, generator: torch.Generator | None = None) -> Particles:
        """x_T ~ N(0, I) in VE units: z = x·√(1 + σ²), drawn on the generator's device (the CPU without one)."""
        x = torch.randn((n, *self.event_shape), generator=generator, device=None if generator is None else generator.device)
        return x * (1.0 + sigma**2) ** 0.5

    @property
    def device(self) -> torch.device:
        """Where the network runs, and where the sampler keeps the particles; others are moved per call."""
        return next(self.model.parameters()).device

    def eps(self, z: Particles, sigma: float) -> Particles:
        return self.eps_network(*self.eps_input(z, sigma)).to(z.device)

    def eps_input(self, z: Particles, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network reads for ε at z, σ: x = z/√(1+σ²) [N, *event] and the timestep per row [N]."""
        t = torch.full((z.shape[0],), self.timestep_of_sigma(sigma), dtype=torch.float32, device=self.device)
        return (z / (1.0 + sigma**2) ** 0.5).to(self.device), t

    def eps_network(self, x: torch.Tensor, t: torch.Tensor, segments: tuple[int, ...] | None = None) -> torch.Tensor:
        """The ε-network on network inputs x [B, *event] at per-row timesteps t [B]; ``segments``: the
        row counts of the callers sharing the call, each given the bits of its own call."""
        return self.model(x, t, segments)

    def features(self, z0: Particles, t: int = 200) -> torch.Tensor:
        """The denoiser's pooled mid-block activations of clean images noised-free at timestep t.

        The input is x = √ᾱ_t·z0 (the mean of x_t given z0), as measured in FINDINGS. [N,1,28,28] -> [N, C].
        """
        return self.features_network(*self.features_input(z0, t)).to(z0.device)

    def features_input(self, z0: Particles, t: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network reads for the features of z0: x = √ᾱ_t·z0 [N, *event], differentiable, and t [N]."""
        acp = float(alphas_cumprod()[t])
        tt = torch.full((z0.shape[0],), float(t), device=self.device)
        return (z0 * acp**0.5).to(self.device), tt

    def features_network(self, x: torch.Tensor, t: torch.Tensor, segments: tuple[int, ...] | None = None
                         ) -> torch.Tensor:
        """The pooled mid-block activations at network inputs x [B, *event], timesteps t [B]: [B, C]
        (``segments`` as in :meth:`eps_network`)."""
        return self.model.features(x, t, segments)

    def decode(self, z0: Particles) -> torch.Tensor:
        """[-1, 1] -> images [N, 1, 28, 28] in [0, 1]."""
        return ((z0 + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode(self, images: torch.Tensor) -> Particles:
        """Images [N, 1, 28, 28] in [0, 1] -> clean particles in [-1, 1] (``decode``'s inverse)."""
        return (images * 2.0 - 1.0).to(self.device)


# ---------------------------------------------------------------- shipping and loading


def weights_path(dataset: str) -> Path:
    return Path(str(resources.files("apa") / "weights" / f"ddpm_{dataset}.safetensors"))


def export_prior(model: UNet, path: Path, dataset: str, data_std: float, info: dict) -> Path:
    """Write a prior's weights and config as safetensors (metadata: unet config, data_std, training info)."""
    meta = {"unet": json.dumps(model.config.to_dict()), "dataset": dataset,
            "data_std": str(data_std), "info": json.dumps(info)}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return Path(path)


def load_prior(dataset: str = "mnist", path: Path | None = None) -> DDPMPrior:
    """The shipped (or a given) DDPM prior. Raises FileNotFoundError naming the path it looked at."""
    path = Path(path) if path is not None else weights_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no DDPM weights at {path}; train them with `apa train-prior --dataset {dataset}` "
                                f"or pass --prior-weights PATH")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        model = UNet(UNetConfig.from_dict(json.loads(meta["unet"])))
        model.load_state_dict(load_file(str(path)))
        data_std, names = float(meta["data_std"]), data_mod.class_names(meta["dataset"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a DDPM prior's weights file ({type(e).__name__}: {e}); pass --prior-weights "
                         "a safetensors file written by `apa train-prior`, or drop it for the shipped one") from e
    return DDPMPrior(model, data_std, name=dataset, class_names=names)


def _factory(dataset: str):
    def make(options: dict) -> DDPMPrior:
        return load_prior(dataset, options.get("weights"))

    return make


PRIORS.register("mnist")(_factory("mnist"))
PRIORS.register("fashion")(_factory("fashion"))
