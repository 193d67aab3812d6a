"""A run lives on the prior's device: no per-step tensor is made elsewhere, a step reads back one
value (the resampling decision), and a session's round reaches the host once, for the store.

No GPU is needed. The CPU run is put in the GPU's regime (``host_sync=False``, and the weights
module told that reading values back is not free); inside every step the default device is
``meta``, so any tensor created without naming the particles' device lands there and fails the
run, and a dispatch mode counts every operation that reads a value back to the host.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from apa.config import SamplerConfig
from apa.compat import ensure_torchvision

ensure_torchvision()
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from tiny_models import make_tiny_sd  # noqa: E402

from apa.config import preset  # noqa: E402
from apa.registry import PRIORS  # noqa: E402
from apa.session import Session, with_overrides  # noqa: E402
from apa.smc import sampler, weights  # noqa: E402
from apa.smc.sampler import SMCResult, fkc_sample  # noqa: E402
from apa.surrogate.model import Ensemble, LatentSurrogate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
              aten.equal.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
              aten.repeat_interleave.Tensor}


class Recorder(TorchDispatchMode):
    """Every operation's name when it reads a value back to the host, and every output not on ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.host_reads, self.elsewhere = device, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in HOST_READS:
            self.host_reads.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.elsewhere.append(f"{func} -> {t.device}")
        return out


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    folder = make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
    return PRIORS.create("sd15", {"model": str(folder), "device": "cpu"})


def _surrogate(prior) -> Ensemble:
    torch.manual_seed(0)
    return Ensemble([LatentSurrogate(prior.event_shape[0])]).eval().requires_grad_(False)


@pytest.fixture
def steps_recorded(monkeypatch):
    """Run every sampler step inside a Recorder with ``meta`` as the default device; yields the records."""
    records: list[Recorder] = []
    real_step = sampler.step
    monkeypatch.setattr(weights, "reads_freely", lambda t: False)  # as on a GPU: no check may read back

    def recorded_step(state, kernel):
        rec = Recorder(torch.device(kernel.prior.device))
        with torch.device("meta"), rec:
            out = real_step(state, kernel)
        records.append(rec)
        return out

    monkeypatch.setattr(sampler, "step", recorded_step)
    return records


@pytest.mark.parametrize("kwargs", [dict(), dict(reward_at="xt", ess_threshold=1.0), dict(jacobian="exact"),
                                    dict(weights="rate", resample="stratified")])
def test_a_step_makes_nothing_off_the_device_and_reads_back_only_the_resampling_decision(
        prior, steps_recorded, kwargs):
    out = fkc_sample(prior, _surrogate(prior), SamplerConfig(particles=4, steps=3, beta=(2.0, 8.0), **kwargs), host_sync=False,
                     generator=torch.Generator().manual_seed(0))
    assert len(steps_recorded) == 3 and torch.isfinite(out.particles).all()
    for rec in steps_recorded:
        assert rec.elsewhere == []  # made on meta (no device named) or copied away
        assert rec.host_reads == ["aten._local_scalar_dense.default"]  # should_resample: ESS < threshold·N
    if kwargs.get("ess_threshold") == 1.0:
        assert any(s.resampled for s in out.trace)
    assert all(isinstance(s.ess, float) and isinstance(s.unique_origins, int) for s in out.trace)


def test_a_plain_step_reads_nothing_back(prior, steps_recorded):
    fkc_sample(prior, lambda z: torch.zeros(z.shape[0], device=z.device), SamplerConfig(particles=4, steps=3,
                                                                                    beta=(0.0, 0.0)), host_sync=False,
               generator=torch.Generator().manual_seed(0))
    assert [rec.host_reads for rec in steps_recorded] == [[], [], []]
    assert [rec.elsewhere for rec in steps_recorded] == [[], [], []]


def test_the_recorder_catches_a_tensor_made_off_the_device(prior, steps_recorded):
    """The check can fail: noise drawn without naming its device lands on meta."""
    def noise_fn(step, shape, generator):
        return torch.randn(shape)  # no device given

    with pytest.raises(RuntimeError, match="meta"):
        fkc_sample(prior, _surrogate(prior), SamplerConfig(particles=4, steps=2), host_sync=False, noise_fn=noise_fn,
                   generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs", [dict(), dict(ess_threshold=1.0, resample="multinomial"), dict(weights="rate")])
def test_deferring_host_reads_changes_no_number(prior, kwargs):
    runs = [fkc_sample(prior, _surrogate(prior), SamplerConfig(particles=4, steps=3, beta=(2.0, 8.0), **kwargs), host_sync=sync,
                       generator=torch.Generator().manual_seed(1)) for sync in (True, False)]
    assert torch.equal(runs[0].particles, runs[1].particles)
    assert torch.equal(runs[0].log_weights, runs[1].log_weights)
    assert runs[0].trace == runs[1].trace and runs[0].log_normalizer == runs[1].log_normalizer


def test_deferred_checks_raise_at_the_end_with_the_same_message(prior):
    def bad(z):
        r = -(z - 0.5).square().mean(dim=(1, 2, 3))
        return torch.where(torch.arange(z.shape[0], device=z.device) == 2, torch.nan, r)

    for sync in (True, False):
        with pytest.raises(FloatingPointError, match=r"step 0: the reward is not finite for particles \[2\]"):
            fkc_sample(prior, bad, SamplerConfig(particles=4, steps=2), host_sync=sync, generator=torch.Generator().manual_seed(0))


def test_a_session_round_reaches_the_host_once_at_the_store(prior, steps_recorded, monkeypatch):
    cfg = with_overrides(preset("default"), sampler={"particles": 4, "steps": 3},
                         session={"per_round": 2, "budget": 4})
    saved = {}
    store = SimpleNamespace(spent=lambda: 0, save_round=lambda r, tensors, shown, info: saved.update(tensors),
                            surrogate_path=lambda q: Path("/nonexistent"), rounds=lambda: [], ratings=lambda r=None: [],
                            forget_marks=lambda: [],
                            record=lambda name: None)
    person = SimpleNamespace(name="human", scale=(1.0, 5.0), evaluate=None)  # no view of the batch: rates only
    session = Session(store, cfg, prior, person, progress=False)
    monkeypatch.setattr(session, "surrogate_after", lambda r, device=None: _surrogate(prior).to(device or "cpu"))
    copies = []
    real_cpu = SMCResult.cpu
    monkeypatch.setattr(SMCResult, "cpu", lambda self: copies.append(1) or real_cpu(self))
    real_run = sampler.run

    def run_watching_transfers(*args, **kwargs):  # no tensor is sent to the host while the steps run
        calls = []
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append("cpu") or self)
            m.setattr(torch.Tensor, "tolist", lambda self: calls.append("tolist") or [])
            m.setattr(torch.Tensor, "numpy", lambda self, *a, **k: calls.append("numpy"))
            yield from real_run(*args, **kwargs)
        assert calls == []

    monkeypatch.setattr(sampler, "run", run_watching_transfers)
    session.sample_round(0)
    # 3 steps of the tilted population and 3 of the explored prior samples, one copy to the host
    assert copies == [1] and len(steps_recorded) == 6 and all(rec.elsewhere == [] for rec in steps_recorded)
    assert set(saved) == {"particles", "log_weights", "shown"}
    assert all(t.device.type == "cpu" for t in saved.values())
