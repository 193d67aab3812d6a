"""Stable Diffusion 1.5 as a VE-form prior, from diffusers components; no forked pipeline.

SD 1.5 is a latent DDPM (ε-prediction, scaled-linear β from 0.00085 to 0.012, 1000 steps)
whose latents z0 = 0.18215·VAE(x) live in (4, H/8, W/8). It enters the sampler in VE form
(``priors/base.py``, SPEC "The mathematics"), exactly as EulerAncestralDiscreteScheduler treats
it: σ_t² = (1 − ᾱ_t)/ᾱ_t, z = x/√ᾱ, and the UNet is called on x = z/√(1+σ²) (the scheduler's
``scale_model_input``). The time grid is the scheduler's: ``set_timesteps`` picks the training
timesteps and σ is interpolated linearly in t on the table from ``alphas_cumprod``; the
scheduler's ``step`` is never called (the ancestral move is :meth:`VEPrior.transition`, which
equals EulerAncestral's σ_up/σ_down step).

The noise prediction is prompt-conditioned with classifier-free guidance
ε = ε_u + w·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6), computed in chunks of ``batch_size``
particles and differentiable in z. Weights come from a local folder in diffusers layout
(``model`` option) or, without network access, from the Hugging Face cache; if neither has
them, :class:`apa.errors.WeightsNotFoundError` names every place searched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apa.compat import ensure_torchvision
from apa.errors import WeightsNotFoundError
from apa.priors.base import VEPrior
from apa.priors.calls import counted
from apa.priors.sd_options import SD15Options
from apa.registry import PRIORS
from apa.types import Particles

SD15_REPOS = ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# SD's VAE scale 0.18215 was chosen as 1/std of the first-stage latents (Rombach et al. 2022,
# LDM configs' ``scale_factor``), so the scaled latents have per-coordinate std ≈ 1.
SD_LATENT_STD = 1.0
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
CPU_BATCH = 8  # particles per call on the CPU (the default batch_size there)


@dataclass(frozen=True)
class SDComponents:
    """The diffusers / transformers parts of an SD 1.5 checkpoint, and where they came from."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: Any  # diffusers EulerAncestralDiscreteScheduler
    source: str = ""


# ---------------------------------------------------------------- finding and loading weights


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (honours HF_HUB_CACHE / HF_HOME)."""
    # the sd extra: loaded only for --prior sd15
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> tuple[Path, Path | None]:
    """(the repo's cache folder, its snapshot holding every component or None). Never touches the network."""
    repo_dir = (cache_dir or hf_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return repo_dir, next((c for c in candidates if _is_complete(c)), None)


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / c).is_dir() for c in COMPONENTS)


def find_weights(model: str | os.PathLike | None) -> Path:
    """The folder (diffusers layout) holding SD 1.5, or WeightsNotFoundError naming every path looked at.

    ``model``: a local folder, a Hugging Face repo id to find in the cache, or None (SD15_REPOS).
    """
    looked: list[str] = []
    repo_ids: list[str] = list(SD15_REPOS)
    if model is not None:
        folder = Path(model).expanduser()
        if _is_complete(folder):
            return folder
        missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
        state = f"missing subfolders {', '.join(missing)}" if folder.is_dir() else "does not exist"
        looked.append(f"{folder.resolve()} (--model: {state})")
        repo_ids = [str(model)] if not folder.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) else []
    for repo_id in repo_ids:
        repo_dir, snapshot = cached_snapshot(repo_id)
        if snapshot is not None:
            return snapshot
        looked.append(f"{repo_dir} (Hugging Face cache for {repo_id})")
    raise WeightsNotFoundError("Stable Diffusion 1.5", looked, _HOW_TO_GET_SD)


_HOW_TO_GET_SD = (
    "Provide the weights in one of two ways:\n"
    "  * point apa at a folder in diffusers layout (subfolders " + ", ".join(COMPONENTS) + "):\n"
    "      apa align --prior sd15 --model /path/to/stable-diffusion-v1-5 ...\n"
    "  * or fill the Hugging Face cache on a machine with internet access and copy it here:\n"
    f"      huggingface-cli download {SD15_REPOS[1]}   (HF_HUB_CACHE / HF_HOME select the cache)"
)


def load_components(folder: Path, device: torch.device, dtype: torch.dtype) -> SDComponents:
    """Load the five components from a diffusers-layout folder, frozen, on ``device`` in ``dtype``."""
    ensure_torchvision()
    # the sd extra: loaded only for --prior sd15
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        scheduler = EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler",
                                                                    local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsNotFoundError("Stable Diffusion 1.5", [f"{folder} (could not load: {err})"],
                                   _HOW_TO_GET_SD) from err
    text_encoder.to(dtype=dtype)  # the diffusers models were loaded in dtype (keeping their fp32 modules)
    for m in (unet, vae, text_encoder):
        m.to(device=device).eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source=str(folder))


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """cuda if available (unless given); float16 on CUDA and float32 on CPU (unless given)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, DTYPE_ALIASES.get(dtype, dtype))


# ---------------------------------------------------------------- the prior


class _StopForward(Exception):
    """Raised by a forward hook to end a UNet pass once the wanted activations exist."""


class StableDiffusionPrior(VEPrior):
    """SD 1.5 in VE form. Particles z [N, 4, H/8, W/8]: VAE latents scaled by 0.18215, plus σ·noise.

    The networks live on ``device`` in ``dtype``; the sampler keeps the particles there too (its
    noise is drawn there), so :meth:`eps` and :meth:`features` take and return tensors on the
    device without a copy. Particles given from elsewhere (the session store's CPU tensors) are
    moved per call and returned where they came from; :meth:`decode` returns images on the CPU.
    """

    def __init__(self, components: SDComponents, options: SD15Options = SD15Options()):
        self.components, self.options = components, options
        self.unet, self.vae = components.unet, components.vae
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.name, self.class_names = "sd15", ()
        self.data_std = SD_LATENT_STD
        self.vae_scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent cell
        self.event_shape = self._latent_shape(options)
        acp = components.scheduler.alphas_cumprod.double().numpy()
        self._sigma_table = np.sqrt((1.0 - acp) / acp)  # σ_t, increasing in t
        self._acp = components.scheduler.alphas_cumprod.tolist()  # ᾱ_t as Python floats (no tensor read per call)
        self.guided = options.guidance_scale != 1.0
        self._cond = self._encode(options.prompt)  # [1, L, D]
        self._uncond = self._encode(options.negative_prompt) if self.guided else None
        self._enable_memory_savers(options)
        self.batch_size = options.batch_size or (CPU_BATCH if self.device.type == "cpu" else None)
        self._denoiser = self._speed_ups(options)

    def _latent_shape(self, options: SD15Options) -> tuple[int, int, int]:
        default = int(np.atleast_1d(self.unet.config.sample_size)[0]) * self.vae_factor
        height, width = options.height or default, options.width or default
        if height % self.vae_factor or width % self.vae_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_factor}, got {height}x{width}")
        return (int(self.unet.config.in_channels), height // self.vae_factor, width // self.vae_factor)

    def _enable_memory_savers(self, options: SD15Options) -> None:
        slicing = options.attention_slicing
        if slicing or (slicing is None and self.unet.device.type == "cpu"):
            self.unet.set_attention_slice("auto")
        if options.vae_slicing or (options.vae_slicing is None and self.unet.device.type == "cpu"):
            self.vae.enable_slicing()
        if options.vae_tiling:
            self.vae.enable_tiling()

    def _speed_ups(self, options: SD15Options):
        """channels_last for UNet and VAE; the UNet callable used by :meth:`eps` (compiled or not).
        :meth:`features` keeps the plain UNet: its forward hook ends the pass at the mid block."""
        if options.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if not options.compile:
            return self.unet
        mode = "reduce-overhead" if options.cuda_graphs else None  # reduce-overhead: CUDA graphs
        return torch.compile(self.unet, mode=mode, fullgraph=False)

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [N, ...] split into generation batches (all of it at once when batch_size is None)."""
        return x.split(self.batch_size) if self.batch_size else (x,)

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden state for one prompt: [1, L, D] (L = tokenizer max length)."""
        tok = self.components.tokenizer
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.components.text_encoder(ids.to(self.device))[0].to(self.dtype)

    # ------------------------------------------------------------ time grid

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The scheduler's training timesteps for ``num_steps`` steps (``set_timesteps``), float64 [num_steps]."""
        self.components.scheduler.set_timesteps(num_steps)
        return self.components.scheduler.timesteps.double().cpu()

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """σ at (fractional) timesteps, linear in t on the ᾱ table as EulerAncestral does. float64."""
        table = self._sigma_table
        return torch.from_numpy(np.interp(t.numpy(), np.arange(len(table)), table))

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """σ at the scheduler's timesteps, then 0: [num_steps + 1] float32, decreasing."""
        sig = self.sigma_of_t(self.timesteps(num_steps))
        return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()

    def timestep_of_sigma(self, sigma: float) -> float:
        """The fractional training timestep whose σ is ``sigma``: the inverse of :meth:`sigma_of_t`."""
        table = self._sigma_table
        return float(np.interp(float(sigma), table, np.arange(len(table), dtype=np.float64)))

    # ------------------------------------------------------------ sampling

    def sample_initial(self, n: int, sigma: float, generator: torch.Generator | None = None) -> Particles:
        """n draws at noise level σ: [n, *event_shape] float32 on the generator's device.

        init="noise": x_T ~ N(0, I) in VE units, z = x·√(1 + σ²). init="prompt" (the seed's start):
        latents from ``init_steps`` plain ancestral steps of the prompt-conditioned model, noised
        to σ by z = z0 + σ·ξ (the VE marginal).
        """
        if self.options.init == "prompt":
            z0 = self.ancestral_sample(n, self.options.init_steps, generator)
            return z0 + sigma * self._randn(n, generator)
        return self._randn(n, generator) * (1.0 + sigma**2) ** 0.5

    def _randn(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal [n, *event_shape] float32 on the generator's device (the CPU without one)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        return torch.randn((n, *self.event_shape), generator=generator, device=dev)

    @torch.no_grad()
    def ancestral_sample(self, n: int, num_steps: int, generator: torch.Generator | None = None) -> Particles:
        """Plain ancestral sampling (EulerAncestral's move) from σ_max to 0: clean latents [n, *event]."""
        sig = self.sigmas(num_steps)
        z = self._randn(n, generator) * (1.0 + float(sig[0]) ** 2) ** 0.5
        for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
            z = self.transition(z, self.eps(z, s), s, s_next, self._randn(n, generator))
        return z

    def eps(self, z: Particles, sigma: float) -> Particles:
        """ε̂(z, σ) with classifier-free guidance, differentiable in z. [N, *event] -> [N, *event] (z's dtype/device).

        The UNet sees x = z/√(1+σ²) at the timestep whose σ this is (SPEC's VE convention).
        """
        t = self.timestep_of_sigma(sigma)
        x = z / (1.0 + sigma**2) ** 0.5
        out = [self._eps_chunk(c, t) for c in self._chunks(x)]
        return counted("eps", torch.cat(out).to(device=z.device, dtype=z.dtype))

    def _eps_chunk(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """One generation batch: x [b, *event] -> ε [b, *event] in the model dtype."""
        b = x.shape[0]
        x = x.to(device=self.device, dtype=self.dtype)
        emb = self._cond.expand(b, -1, -1)
        if self.guided:
            x, emb = torch.cat([x, x]), torch.cat([self._uncond.expand(b, -1, -1), emb])
        tt = torch.full((x.shape[0],), t, device=self.device, dtype=torch.float32)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._denoiser(x, tt, encoder_hidden_states=emb).sample
        if not self.guided:
            return out
        e_u, e_c = out.chunk(2)
        return e_u + self.options.guidance_scale * (e_c - e_u)  # CFG (Ho & Salimans 2022, eq. 6)

    def features(self, z0: Particles, t: int = 200) -> torch.Tensor:
        """The prompt-conditioned UNet's mid-block activations, averaged over space, for clean latents
        noise-free at timestep t: the input is x = √ᾱ_t·z0, the mean of x_t given z0 (as ``DDPMPrior.features``).

        Differentiable in z0; the UNet's up path is not run. [N, *event] -> [N, C_mid] float32 on z0's device.
        """
        scale = self._acp[int(t)] ** 0.5
        out = [self._mid_block(c * scale, float(t)) for c in self._chunks(z0)]
        return counted("features", torch.cat(out).to(device=z0.device, dtype=torch.float32))

    def _mid_block(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Spatially averaged mid-block output for one batch x [b, *event] -> [b, C_mid] (float32)."""
        found: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            found["h"] = output
            raise _StopForward

        handle = self.unet.mid_block.register_forward_hook(hook)
        b = x.shape[0]
        try:
            self.unet(x.to(device=self.device, dtype=self.dtype), torch.full((b,), t, device=self.device),
                      encoder_hidden_states=self._cond.expand(b, -1, -1))
        except _StopForward:
            pass
        finally:
            handle.remove()
        return found["h"].float().mean(dim=(2, 3))

    @torch.no_grad()
    def decode(self, z0: Particles) -> torch.Tensor:
        """Clean latents [N, *event] -> images [N, 3, H, W] float32 in [0, 1] on the CPU (VAE in batches)."""
        images = []
        for chunk in self._chunks(z0):
            lat = chunk.to(device=self.device, dtype=self.dtype) / self.vae_scale
            img = self.vae.decode(lat).sample  # [-1, 1]
            images.append((img.float() / 2 + 0.5).clamp(0.0, 1.0).cpu())
        return torch.cat(images)


def load_sd15(options: SD15Options = SD15Options(), device: str | None = None) -> StableDiffusionPrior:
    """Find the weights (folder or HF cache), load them on ``device`` (none: cuda when available) and
    wrap them as a prior."""
    folder = find_weights(options.model)
    dev, dtype = resolve_device(device, options.dtype)
    return StableDiffusionPrior(load_components(folder, dev, dtype), options)


@PRIORS.register("sd15")
def make_sd15(options: dict) -> StableDiffusionPrior:
    """The ``--prior sd15`` factory: the prior options (``config.PriorConfig`` as a dict) read once
    into this backend's own :class:`SD15Options`, and ``device``."""
    return load_sd15(SD15Options.from_dict(options), options.get("device"))
