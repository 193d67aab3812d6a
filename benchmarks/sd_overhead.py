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

The anchor is diffusers' own StableDiffusionPipeline on the same networks, generating the same
number of images with the same steps, CFG, dtype and device (decoding included), timed in the
same run; every apa row is printed as a ratio to it, beside the FLOP limit: the UNet and VAE
FLOPs of a round (torch's FlopCounterMode) at the device's peak rate (``--peak-tflops``: the
H200's ~790 dense fp16 TFLOP/s on CUDA; on a CPU the rate of a large fp32 matmul, measured).
``--profile`` counts, over one FKC round, the values read back to the host (aten::_local_scalar_dense)
and, on CUDA, the device-to-host copies.

On CUDA the default is the seed's full size (512 px, 4x64x64 latents, 32 particles, 25 steps,
fp16). On a CPU it is reduced to 64 px (4x8x8 latents), 4 particles, 4 steps, fp32, and the
output says so. Usage: ``python benchmarks/sd_overhead.py [--device cuda] [--particles 32] ...``;
the optional speed-ups: ``--dtype bf16``, ``--channels-last``, ``--compile`` (compile time
reported separately), ``--cuda-graphs``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from apa.config import SamplerConfig
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


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def one_round(prior, reward, particles: int, steps: int, seed: int, **fkc) -> float:
    """Seconds for one round: fkc_sample, then decoding every particle."""
    from apa import fkc_sample

    def go():
        out = fkc_sample(prior, reward, SamplerConfig(particles=particles, steps=steps, **fkc),
                         generator=torch.Generator().manual_seed(seed))
        prior.decode(out.particles)

    return _timed(prior.device, go)


def diffusers_pipeline(prior):
    """diffusers' StableDiffusionPipeline on the prior's own networks (the plain UNet, never compiled)."""
    from diffusers import StableDiffusionPipeline

    c = prior.components
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def anchor_round(pipe, prior, n: int, steps: int, batch: int, seed: int) -> float:
    """Seconds for diffusers to generate n images (batches of ``batch``), same steps, CFG, size, dtype, device."""
    _, h, w = prior.event_shape

    def go():
        gen = torch.Generator(device=prior.device).manual_seed(seed)
        for start in range(0, n, batch):
            b = min(batch, n - start)
            pipe(prompt=[prior.options.prompt] * b, negative_prompt=[prior.options.negative_prompt] * b,
                 num_inference_steps=steps, guidance_scale=prior.options.guidance_scale,
                 height=h * prior.vae_factor, width=w * prior.vae_factor, generator=gen, output_type="pt")

    with torch.no_grad():
        return _timed(prior.device, go)


def round_flops(prior, n: int, steps: int) -> float:
    """FLOPs of a plain round's networks: ``steps`` CFG noise predictions of n particles and n decodes."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.zeros(n, *prior.event_shape, device=prior.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        prior.unet(torch.cat([z, z]).to(prior.dtype), torch.full((2 * n,), 500.0, device=prior.device),
                   encoder_hidden_states=prior._cond.expand(2 * n, -1, -1))
    unet = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        prior.vae.decode(z[:1].to(prior.dtype))
    return steps * unet + n * counter.get_total_flops()


def cpu_peak_tflops(threads: int) -> float:
    """The rate of a 1024x1024 fp32 matmul on this CPU, TFLOP/s (the CPU's practical peak)."""
    a = torch.randn(1024, 1024)
    a @ a
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        a @ a
        reps += 1
    return 2 * 1024**3 * reps / (time.perf_counter() - start) / 1e12


def host_traffic(prior, reward, n: int, steps: int, **fkc) -> str:
    """What one FKC round (GPU regime: host_sync=False) reads back to the host, by torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    from apa import fkc_sample

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prior.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fkc_sample(prior, reward, SamplerConfig(particles=n, steps=steps, **fkc), generator=torch.Generator().manual_seed(0),
                   host_sync=False)
        _sync(prior.device)
    events = prof.events()
    reads = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    d2h = sum(1 for e in events if "DtoH" in e.name or "Device -> Pageable" in e.name)
    h2d = sum(1 for e in events if "HtoD" in e.name or "Pageable -> Device" in e.name)
    extra = f", {d2h} device-to-host and {h2d} host-to-device copies" if prior.device.type == "cuda" else ""
    return (f"one FKC round of {steps} steps reads {reads} values back to the host "
            f"(one a step is the resampling decision; the rest come once, at the run's end){extra}")


VARIANTS = {  # name -> (description, surrogate, fkc_sample keywords beyond the seed's β 0.5→2, γ 0.05→0)
    "plain": ("apa plain (β = 0)", "seed", dict(beta=(0.0, 0.0))),
    "features": ("apa FKC, UNet-feature surrogate, r(ẑ0), Gaussian ∂ẑ0/∂z (default)", "features",
                 dict(reward_at="tweedie", jacobian="gaussian")),
    "xt": ("apa FKC, seed surrogate, r(z_t)", "seed", dict(reward_at="xt")),
    "tweedie-gaussian": ("apa FKC, seed surrogate, r(ẑ0), Gaussian ∂ẑ0/∂z", "seed",
                         dict(reward_at="tweedie", jacobian="gaussian")),
    "tweedie-exact": ("apa FKC, seed surrogate, r(ẑ0), exact ∂ẑ0/∂z (UNet backward)", "seed",
                      dict(reward_at="tweedie", jacobian="exact")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (CUDA 512, CPU 64)")
    p.add_argument("--particles", type=int, default=None, help="N (CUDA 32, CPU 4)")
    p.add_argument("--steps", type=int, default=None, help="S (CUDA 25, CPU 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row; the median is shown")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--batch-size", type=int, default=None,
                   help="particles per UNet / VAE call (SD15Options.batch_size; default: 8 on a CPU, all on a GPU)")
    p.add_argument("--anchor-batch", type=int, default=None, help="images per diffusers pipeline call (default: all)")
    p.add_argument("--dtype", default=None, help="float16 | bf16 | float32 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--channels-last", action="store_true", help="SD15Options.channels_last")
    p.add_argument("--compile", action="store_true", help="SD15Options.compile (compile time reported separately)")
    p.add_argument("--cuda-graphs", action="store_true", help="SD15Options.cuda_graphs (implies --compile)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for the FLOP limit (CUDA: 790, the H200's dense fp16; CPU: measured)")
    p.add_argument("--profile", action="store_true", help="count one FKC round's reads back to the host")
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
    from apa.priors.sd_options import SD15Options
    from apa.priors.stable_diffusion import StableDiffusionPrior, resolve_device

    _, dtype = resolve_device(str(device), SD15Options.from_dict({"dtype": args.dtype}).dtype)
    t0 = time.perf_counter()
    opts = SD15Options(height=size, width=size, prompt="a photo of fruit", batch_size=args.batch_size,
                       channels_last=args.channels_last, compile=args.compile or args.cuda_graphs,
                       cuda_graphs=args.cuda_graphs)
    prior = StableDiffusionPrior(sd15_random_components(device, dtype), opts)
    # the surrogates live on the prior's device, as in a session
    rewards = {"seed": SeedSurrogate(prior.event_shape[0]).to(device).requires_grad_(False),
               "features": FeatureReward(prior).to(device).requires_grad_(False)}
    print(f"built the random SD 1.5 architecture in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    reduced = "" if (size, n, steps) == (512, 32, 25) else " (reduced from the seed's 512 px, 32 particles, 25 steps)"
    flags = [f for f, on in (("channels_last", args.channels_last), ("compile", opts.compile),
                             ("cuda_graphs", args.cuda_graphs)) if on]
    print(f"device {device} ({torch.cuda.get_device_name(device) if full else f'{args.threads} CPU thread(s)'}), "
          f"dtype {str(dtype).replace('torch.', '')}, latents {tuple(prior.event_shape)} = {size} px, "
          f"{n} particles, {steps} steps, CFG 7.5, UNet batch {prior.batch_size or 'all'} particles"
          f"{', ' + ', '.join(flags) if flags else ''}, {repeats} timed round(s) after a warm-up{reduced}")
    warm = one_round(prior, rewards["seed"], n, steps, 0, beta=(0.0, 0.0))  # allocations, kernels, compilation
    warm_fkc = one_round(prior, rewards["features"], n, steps, 0)  # the backward graphs as well
    if opts.compile:
        print(f"compile: the first plain round took {warm:.1f} s and the first FKC round {warm_fkc:.1f} s "
              "(compilation included; not in the table)")
    pipe = diffusers_pipeline(prior)
    anchor_round(pipe, prior, min(n, args.anchor_batch or n), 2, args.anchor_batch or n, 0)  # warm-up
    peak = args.peak_tflops or (790.0 if full else cpu_peak_tflops(args.threads))
    limit = round_flops(prior, n, steps) / (peak * 1e12)
    print_table(prior, pipe, rewards, n, steps, repeats, variants, args.anchor_batch or n, limit, peak)
    if args.profile:
        print("\n" + host_traffic(prior, rewards["features"], n, steps))


def print_table(prior, pipe, rewards: dict, n: int, steps: int, repeats: int, variants: list[str],
                anchor_batch: int, limit: float, peak: float) -> None:
    """Interleave the anchor and every apa row; print median seconds per round and the ratios."""
    times: dict[str, list[float]] = {"anchor": [], **{v: [] for v in variants}}
    for r in range(repeats):
        times["anchor"].append(anchor_round(pipe, prior, n, steps, anchor_batch, r))
        for name in variants:
            _, reward, kwargs = VARIANTS[name]
            times[name].append(one_round(prior, rewards[reward], n, steps, r, **kwargs))
    anchor = statistics.median(times["anchor"])
    print(f"\nFLOP limit of a round (UNet + VAE, FlopCounterMode) at {peak:.3g} TFLOP/s: {limit:.3f} s")
    print("\n| round | s/round | / diffusers | / FLOP limit |")
    print("|---|---|---|---|")
    print(f"| diffusers StableDiffusionPipeline, {n} images, batch {anchor_batch} (anchor) | {anchor:.2f} | "
          f"1.00x | {anchor / limit:.1f}x |")
    for name in variants:
        t = statistics.median(times[name])
        print(f"| {VARIANTS[name][0]} | {t:.2f} | {t / anchor:.2f}x | {t / limit:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
