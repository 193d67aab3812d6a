"""The shipped DDPM prior loads, samples in range, and is the file its model card describes."""

import copy
import hashlib

import numpy as np
import pytest
import torch

from apa.config import SamplerConfig
from apa import fkc_sample
from apa.cli import main
from apa.priors import ddpm

SHIPPED_SHA256 = {"mnist": "dfcbd201af60405f0bdb18638dc2b97432bb073d68609be2dd17c7a199c8bc7d",
                  "fashion": "b7b35c57d10a21a342d686be92cb82e1932b0544b393c4d7c6818eb5383b3e4d"}


@pytest.fixture(scope="module")
def prior():
    return ddpm.load_prior("mnist")


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_shipped_file_checksum_size_and_metadata(dataset):
    path = ddpm.weights_path(dataset)
    assert path.stat().st_size < 10 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED_SHA256[dataset]
    loaded = ddpm.load_prior(dataset)
    assert loaded.class_names and len(loaded.class_names) == 10
    assert 0.4 < loaded.data_std < 0.8


def test_schedule_is_papas_and_sigmas_come_from_it(prior):
    acp = ddpm.alphas_cumprod()
    assert acp.shape == (1000,)
    betas = 1 - acp[1:] / acp[:-1]
    assert betas[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-3)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-3)
    s = prior.sigmas(25)
    t = ddpm.respaced_timesteps(25)
    assert t[0] == 999 and t[-1] == 0 and s[-1] == 0
    assert torch.allclose(s[:-1] ** 2, ((1 - acp[t]) / acp[t]).float(), rtol=1e-4)
    assert prior.timestep_of_sigma(float(s[3])) == pytest.approx(float(t[3]), abs=1e-3)


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_samples_have_the_right_shape_and_range(dataset):
    prior = ddpm.load_prior(dataset)
    res = fkc_sample(prior, lambda z: torch.zeros(z.shape[0]), SamplerConfig(particles=4, steps=10, beta=(0.0, 0.0)),
                     generator=torch.Generator().manual_seed(0))
    images = prior.decode(res.particles)
    assert images.shape == (4, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.1  # not blank


def test_eps_is_differentiable_in_z(prior):
    z = torch.randn(2, 1, 28, 28, requires_grad=True)
    prior.eps(z, 3.0).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_sample_command_writes_images(tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--prior", "mnist", "-n", "3", "--steps", "5", "--out", str(out),
                 "--grid", str(tmp_path / "g.png")]) == 0
    with np.load(out) as z:
        assert z["images"].shape == (3, 1, 28, 28) and z["images"].dtype == np.float32
    assert (tmp_path / "g.png").stat().st_size > 0


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-prior"):
        ddpm.load_prior("mnist", tmp_path / "nope.safetensors")


def test_channels_last_network_computes_what_the_contiguous_one_does(prior):
    """The prior runs its network in channels-last memory (speed only). Against a copy of the same weights
    in contiguous memory, ε and the features' gradient agree to float32 rounding (measured: ≤ 4e-6 on
    values of order 1); a layout slip (a view that reads the wrong strides) would differ by order 1."""
    assert prior.model.down1.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(prior.model).to(memory_format=torch.contiguous_format)
    assert plain.down1.conv1.weight.is_contiguous()
    z = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x, t = prior.eps_input(z, 2.0)
    assert torch.allclose(prior.eps_network(x, t), plain(x, t), atol=1e-4)
    grads = []
    for net in (prior.model, plain):
        xx = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(net.features(xx, torch.full((16,), 200.0)).pow(2).sum(), xx)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-4 * float(grads[1].abs().max()))
