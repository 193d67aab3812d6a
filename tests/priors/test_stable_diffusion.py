"""The SD 1.5 prior on a tiny randomly-initialised checkpoint of the same classes, saved in diffusers
layout and loaded through the real loader (no weights are downloaded)."""

from __future__ import annotations

import math
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from apa.config import SamplerConfig
from apa.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()  # before anything imports torchvision
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from tiny_models import make_tiny_sd  # noqa: E402

from apa.priors.sd_options import DEFAULT_PROMPT, SD15Options  # noqa: E402

from apa.errors import WeightsNotFoundError  # noqa: E402
from apa.priors import stable_diffusion as sd  # noqa: E402
from apa.registry import PRIORS  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only spin-waits


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def prior(tiny_sd) -> sd.StableDiffusionPrior:
    return PRIORS.create("sd15", {"model": str(tiny_sd), "device": "cpu", "prompt": "a photo of fruit"})


def _scheduler(folder: Path):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")


def test_stable_diffusion_loads_tiny_folder_through_registry(prior):
    assert isinstance(prior, sd.StableDiffusionPrior)
    assert prior.event_shape == (4, 8, 8)  # unet.sample_size 8 · vae factor 2 = 16 px -> 8x8 latents
    assert prior.dtype == torch.float32 and prior.device.type == "cpu"  # fp32 on CPU
    assert prior.vae_scale == pytest.approx(0.18215) and prior.data_std == 1.0
    assert prior.guided and prior._uncond.shape == prior._cond.shape == (1, 77, 32)
    assert prior.vae.use_slicing and prior.vae.use_tiling


@pytest.mark.parametrize("num_steps", [1, 5, 25])
def test_stable_diffusion_sigmas_are_the_schedulers(prior, tiny_sd, num_steps):
    sig = prior.sigmas(num_steps)
    assert sig.shape == (num_steps + 1,) and sig[-1] == 0.0
    assert bool((sig[1:] < sig[:-1]).all())
    ref = _scheduler(tiny_sd)
    ref.set_timesteps(num_steps)
    torch.testing.assert_close(sig, ref.sigmas.float(), rtol=1e-6, atol=1e-6)
    acp = ref.alphas_cumprod.double()
    if num_steps > 1:  # (linspace spacing puts a single step at t = 0)
        assert float(sig[0]) == pytest.approx(math.sqrt((1 - acp[-1]) / acp[-1]), rel=1e-6)  # σ_max at t = 999
    for s, t in zip(sig[:-1].tolist(), ref.timesteps.tolist()):
        assert prior.timestep_of_sigma(s) == pytest.approx(t, abs=1e-3)


def test_stable_diffusion_transition_equals_euler_ancestral_step(prior, tiny_sd):
    """EulerAncestral: σ_up² = σ'²(σ² − σ'²)/σ², σ_down² = σ'² − σ_up², z' = z + (σ_down − σ)·ε + σ_up·ξ."""
    num_steps = 6
    ref = _scheduler(tiny_sd)
    ref.set_timesteps(num_steps)
    sig = prior.sigmas(num_steps)
    z = prior.sample_initial(3, float(sig[0]), torch.Generator().manual_seed(1))
    for i, t in enumerate(ref.timesteps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        x_in = ref.scale_model_input(z, t)
        torch.testing.assert_close(x_in, z / math.sqrt(1 + s**2))  # the UNet's input x = z/√(1+σ²)
        eps = prior.eps(z, s)
        expected = ref.step(eps, t, z, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(i))
        z_next = prior.transition(z, eps, s, s_next, noise)
        torch.testing.assert_close(z_next, expected, rtol=1e-5, atol=1e-5)
        sigma_up2 = s_next**2 * (s**2 - s_next**2) / s**2
        assert prior.transition_variance(s, s_next) == pytest.approx(sigma_up2, rel=1e-9, abs=1e-12)
        assert math.sqrt(max(s_next**2 - sigma_up2, 0.0)) == pytest.approx(s_next**2 / s, rel=1e-6, abs=1e-9)
        z = z_next


def test_stable_diffusion_eps_chunks_and_classifier_free_guidance(prior):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, *prior.event_shape, generator=g) * 3  # 10 particles: chunks of 8 and 2
    s = float(prior.sigmas(5)[1])
    eps = prior.eps(z, s)
    assert eps.shape == z.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    torch.testing.assert_close(eps, torch.cat([prior.eps(z[:3], s), prior.eps(z[3:], s)]), rtol=1e-4, atol=1e-5)
    x = z / math.sqrt(1 + s**2)
    t = torch.full((10,), prior.timestep_of_sigma(s))
    with torch.no_grad():
        e_c = prior.unet(x, t, encoder_hidden_states=prior._cond.expand(10, -1, -1)).sample
        e_u = prior.unet(x, t, encoder_hidden_states=prior._uncond.expand(10, -1, -1)).sample
    torch.testing.assert_close(eps, e_u + 7.5 * (e_c - e_u), rtol=1e-4, atol=1e-4)


def test_stable_diffusion_without_guidance_uses_the_prompt_branch_only(tiny_sd):
    plain = sd.StableDiffusionPrior(
        sd.load_components(tiny_sd, torch.device("cpu"), torch.float32), SD15Options(guidance_scale=1.0))
    z = torch.randn(2, *plain.event_shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), plain.timestep_of_sigma(2.0))
    with torch.no_grad():
        e_c = plain.unet(z / math.sqrt(5.0), t, encoder_hidden_states=plain._cond.expand(2, -1, -1)).sample
    assert plain._uncond is None
    torch.testing.assert_close(plain.eps(z, 2.0), e_c, rtol=1e-5, atol=1e-5)


def test_stable_diffusion_eps_is_differentiable_in_z(prior):
    z = torch.randn(9, *prior.event_shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    s = 3.0
    x0 = prior.tweedie(z, s)  # ẑ0 = z − σ·ε(z), through the UNet
    (grad,) = torch.autograd.grad(x0.square().sum(), z)
    assert grad.shape == z.shape and torch.isfinite(grad).all()
    assert float((grad - 2 * x0.detach()).abs().max()) > 1e-6  # the network's Jacobian contributes


def test_stable_diffusion_features_are_the_pooled_mid_block(prior):
    z0 = torch.randn(10, *prior.event_shape, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    feats = prior.features(z0, 200)
    assert feats.shape == (10, 32) and feats.dtype == torch.float32 and feats.device == z0.device
    (grad,) = torch.autograd.grad(feats.square().sum(), z0)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    captured = {}
    handle = prior.unet.mid_block.register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    x = z0.detach()[:3] * float(prior.components.scheduler.alphas_cumprod[200]) ** 0.5  # √ᾱ_t·z0
    with torch.no_grad():
        prior.unet(x, torch.full((3,), 200.0), encoder_hidden_states=prior._cond.expand(3, -1, -1))
    handle.remove()
    torch.testing.assert_close(feats[:3].detach(), captured["h"].mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_stable_diffusion_decode_shapes_and_range(prior):
    z0 = torch.randn(9, *prior.event_shape, generator=torch.Generator().manual_seed(4))
    images = prior.decode(z0)
    assert images.shape == (9, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with torch.no_grad():
        direct = (prior.vae.decode(z0[:2] / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images[:2], direct, rtol=1e-4, atol=1e-5)


def test_stable_diffusion_sample_initial_is_ve_noise(prior):
    s = float(prior.sigmas(25)[0])
    a = prior.sample_initial(64, s, torch.Generator().manual_seed(5))
    b = prior.sample_initial(64, s, torch.Generator().manual_seed(5))
    assert a.shape == (64, *prior.event_shape) and torch.equal(a, b)
    assert float(a.std()) == pytest.approx(math.sqrt(1 + s**2), rel=0.03)  # x_T ~ N(0, I), z = x·√(1+σ²)


def test_stable_diffusion_initial_scale_matches_leading_scheduler(tmp_path):
    """With "leading" spacing the scheduler's init_noise_sigma is exactly √(σ_max² + 1)."""
    folder = make_tiny_sd(tmp_path / "leading", timestep_spacing="leading")
    p = sd.StableDiffusionPrior(sd.load_components(folder, torch.device("cpu"), torch.float32))
    ref = _scheduler(folder)
    ref.set_timesteps(10)
    sig = p.sigmas(10)
    torch.testing.assert_close(sig, ref.sigmas.float())
    assert math.sqrt(1 + float(sig[0]) ** 2) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def test_stable_diffusion_prompt_init(tiny_sd):
    p = PRIORS.create("sd15", {"model": str(tiny_sd), "device": "cpu", "init": "prompt", "init_steps": 3})
    s = float(p.sigmas(4)[0])
    a = p.sample_initial(5, s, torch.Generator().manual_seed(6))
    b = p.sample_initial(5, s, torch.Generator().manual_seed(6))
    assert a.shape == (5, *p.event_shape) and torch.equal(a, b) and torch.isfinite(a).all()
    z0 = p.ancestral_sample(5, 3, torch.Generator().manual_seed(6))
    assert z0.shape == a.shape and not torch.equal(z0, a)


def test_stable_diffusion_options(tiny_sd):
    opts = SD15Options.from_dict({"name": "sd15", "weights": None, "model": str(tiny_sd), "prompt": None})
    assert opts.prompt == DEFAULT_PROMPT and opts.guidance_scale == 7.5 and opts.model == str(tiny_sd)
    with pytest.raises(ValueError, match="unknown --dtype"):
        SD15Options.from_dict({"dtype": "float64"})
    with pytest.raises(ValueError, match="unknown --init"):
        SD15Options.from_dict({"init": "image"})
    comps = sd.load_components(tiny_sd, torch.device("cpu"), torch.float32)
    assert sd.StableDiffusionPrior(comps, SD15Options(height=32, width=24)).event_shape == (4, 16, 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        SD15Options(height=15)


def test_stable_diffusion_found_in_hf_cache(tiny_sd, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5" / "snapshots" / "abc123"
    shutil.copytree(tiny_sd, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert sd.find_weights(None) == snapshot
    assert PRIORS.create("sd15", {"device": "cpu"}).components.source == str(snapshot)


def test_stable_diffusion_missing_weights_error_names_every_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        PRIORS.create("sd15", {"device": "cpu"})
    msg = str(info.value)
    for repo in sd.SD15_REPOS:
        assert str(tmp_path / "hub" / f"models--{repo.replace('/', '--')}") in msg
    assert "--model /path/to/stable-diffusion-v1-5" in msg and "huggingface-cli download" in msg
    assert isinstance(info.value, FileNotFoundError) and "Errno" not in msg

    with pytest.raises(WeightsNotFoundError, match="does not exist") as info:
        sd.find_weights(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match="missing subfolders vae, text_encoder, tokenizer, scheduler"):
        sd.find_weights(tmp_path / "partial")


def test_stable_diffusion_runs_under_fkc_sample(prior):
    fkc_sample = pytest.importorskip("apa").__dict__.get("fkc_sample")
    if fkc_sample is None:
        pytest.skip("apa.fkc_sample is not available")

    def reward(z: torch.Tensor) -> torch.Tensor:
        return -(z - 0.5).square().mean(dim=(1, 2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent dtype / device fallbacks
        for reward_at in ("xt", "tweedie"):
            out = fkc_sample(prior, reward, SamplerConfig(particles=4, steps=3, reward_at=reward_at),
                             generator=torch.Generator().manual_seed(0))
            assert out.particles.shape == (4, *prior.event_shape) and torch.isfinite(out.particles).all()
            assert out.log_weights.shape == (4,) and len(out.trace) == 3


@pytest.mark.parametrize("options", [{"dtype": "bf16"}, {"channels_last": True}, {"batch_size": 3}])
def test_stable_diffusion_speed_options_run_on_the_cpu(tiny_sd, options):
    p = PRIORS.create("sd15", {"model": str(tiny_sd), "device": "cpu", **options})
    assert p.dtype == (torch.bfloat16 if "dtype" in options else torch.float32)
    z = torch.randn(4, *p.event_shape, generator=torch.Generator().manual_seed(0))
    eps = p.eps(z, 3.0)
    assert eps.dtype == torch.float32 and eps.shape == z.shape and torch.isfinite(eps).all()
    assert p.decode(z).shape == (4, 3, 16, 16)
    if options.get("channels_last"):
        assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_stable_diffusion_speed_option_checks():
    assert SD15Options.from_dict({"dtype": "bfloat16"}).dtype == "bf16"  # torch's name, read as the flag's
    assert SD15Options.from_dict({}).batch_size is None  # 8 on the CPU, every particle at once on a GPU
    with pytest.raises(ValueError, match="--cuda-graphs"):
        SD15Options.from_dict({"cuda_graphs": True})
    with pytest.raises(ValueError, match="--sd-batch-size"):
        SD15Options.from_dict({"batch_size": 0})
