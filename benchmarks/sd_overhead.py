"""What FKC-SMC costs on the Stable Diffusion 1.5 architecture, against plain ancestral sampling.

One round = ``fkc_sample`` of N particles over S steps, then decoding all N latents to images.
The plain baseline is the very same call with ``beta=(0.0, 0.0)`` (no reward, no weights), so
the two differ only in what FKC adds: the surrogate's value and gradient at every step, the
log-weight increments and the resampling; with ``reward_at="tweedie"`` and ``jacobian="exact"``
also a backward pass through the UNet per step. Both run side by side in one process, on the
same randomly-initialised SD 1.5 networks (UNet 320-640-1280-1280, VAE 128-256-512-512,
CLIP-L text encoder: the timing depends on the architecture, not on the weights) and the seed's
surrogate, Conv2d(4→128) → AdaptiveAvgPool2d → MLP(128→256→128→1), or this project's default
surrogate, a small MLP on the prior's own UNet mid-block features (``prior.features``).

On CUDA the default is the seed's full size (512 px, 4x64x64 latents, 32 particles, 25 steps,
fp16). On a CPU it is reduced to 64 px (4x8x8 latents), 4 particles, 4 steps, fp32, and the
output says so. Usage: ``python benchmarks/sd_overhead.py [--device cuda] [--particles 32] ...``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from apa.compat import ensure_torchvision

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_clip_tokenizer"


def sd15_random_components(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD 1.5's UNet, VAE and text encoder with random weights (their published configs), EulerAncestral."""
    ensure_torchvision()
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from apa.priors.stable_diffusion import SDComponents

    dlogging.set_verbosity_error()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    # the tokenizer only turns the prompt into ids once; a small BPE vocabulary does that as well
    tokenizer = CLIPTokenizer(str(FIXTURE_TOKENIZER / "vocab.json"), str(FIXTURE_TOKENIZER / "merges.txt"),
                              model_max_length=77)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                num_train_timesteps=1000, steps_offset=1)
    for m in (unet, vae, text):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return SDComponents(unet, vae, text, tokenizer, scheduler, source="random SD 1.5 architecture")


class SeedSurrogate(nn.Module):
    """The seed's LatentSurrogate: Conv2d(C→128) → AdaptiveAvgPool2d → MLP(128→256→128→1). [N, C, H, W] -> [N]."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, 128, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(torch.relu(self.conv(z))).flatten(1)).squeeze(1)


class FeatureReward(nn.Module):
    """The project's default surrogate: LayerNorm + MLP on the prior's pooled UNet mid-block features. [N, ...] -> [N]."""

    def __init__(self, prior, t: int = 200, hidden: int = 128):
        super().__init__()
        self._prior, self.t = [prior], t
        dim = prior.features(torch.zeros(1, *prior.event_shape), t).shape[1]
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(self._prior[0].features(z, self.t))).squeeze(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_round(prior, reward, particles: int, steps: int, seed: int, **fkc) -> float:
    """Seconds for one round: fkc_sample, then decoding every particle."""
    from apa import fkc_sample

    _sync(prior.device)
    start = time.perf_counter()
    out = fkc_sample(prior, reward, particles=particles, steps=steps,
                     generator=torch.Generator().manual_seed(seed), **fkc)
    prior.decode(out.particles)
    _sync(prior.device)
    return time.perf_counter() - start


VARIANTS = {  # name -> (description, surrogate, fkc_sample keywords beyond the seed's β 0.5→2, γ 0.05→0)
    "xt": ("FKC, seed surrogate, r(z_t)", "seed", dict(reward_at="xt")),
    "tweedie-exact": ("FKC, seed surrogate, r(ẑ0), exact ∂ẑ0/∂z (UNet backward)", "seed",
                      dict(reward_at="tweedie", jacobian="exact")),
    "tweedie-gaussian": ("FKC, seed surrogate, r(ẑ0), Gaussian ∂ẑ0/∂z", "seed",
                         dict(reward_at="tweedie", jacobian="gaussian")),
    "features": ("FKC, UNet-feature surrogate, r(ẑ0), Gaussian ∂ẑ0/∂z (apa's default)", "features",
                 dict(reward_at="tweedie", jacobian="gaussian")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (CUDA 512, CPU 64)")
    p.add_argument("--particles", type=int, default=None, help="N (CUDA 32, CPU 4)")
    p.add_argument("--steps", type=int, default=None, help="S (CUDA 25, CPU 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant; the median is shown")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--batch-size", type=int, default=8, help="particles per UNet / VAE call (SDOptions.batch_size)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    full = device.type == "cuda"
    size, n, steps = args.size or (512 if full else 64), args.particles or (32 if full else 4), args.steps or (
        25 if full else 4)
    repeats = args.repeats or 3
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    dtype = torch.float16 if full else torch.float32
    from apa.priors.stable_diffusion import SDOptions, StableDiffusionPrior

    t0 = time.perf_counter()
    prior = StableDiffusionPrior(sd15_random_components(device, dtype),
                                 SDOptions(height=size, width=size, device=str(device), prompt="a photo of fruit",
                                           batch_size=args.batch_size))
    # the surrogates stay on the CPU with the particles (as in a session); the prior moves each batch
    rewards = {"seed": SeedSurrogate(prior.event_shape[0]).requires_grad_(False),
               "features": FeatureReward(prior).requires_grad_(False)}
    print(f"built the random SD 1.5 architecture in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    reduced = "" if (size, n, steps) == (512, 32, 25) else " (reduced from the seed's 512 px, 32 particles, 25 steps)"
    print(f"device {device} ({torch.cuda.get_device_name(device) if full else f'{args.threads} CPU thread(s)'}), "
          f"dtype {str(dtype).replace('torch.', '')}, latents {tuple(prior.event_shape)} = {size} px, "
          f"{n} particles, {steps} steps, CFG 7.5, {repeats} timed round(s) after a warm-up{reduced}")
    one_round(prior, rewards["seed"], n, 1, 0, beta=(0.0, 0.0))  # warm-up (allocations, kernels)
    print_table(prior, rewards, n, steps, repeats, variants)


def print_table(prior, rewards: dict, n: int, steps: int, repeats: int, variants: list[str]) -> None:
    """Interleave plain and FKC rounds; print median seconds per round and the ratio."""
    dev, dt = prior.device.type, str(prior.dtype).replace("torch.", "")
    print("\n| sampler | device | dtype | plain s/round | FKC s/round | FKC / plain |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        desc, reward, kwargs = VARIANTS[name][0], rewards[VARIANTS[name][1]], VARIANTS[name][2]
        plain, fkc = [], []
        for r in range(repeats):
            plain.append(one_round(prior, reward, n, steps, r, beta=(0.0, 0.0)))
            fkc.append(one_round(prior, reward, n, steps, r, **kwargs))
        p, f = statistics.median(plain), statistics.median(fkc)
        print(f"| {desc} | {dev} | {dt} | {p:.2f} | {f:.2f} | {f / p:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
