"""Training the built-in DDPM prior: a run resumes where it stopped and exports a file the prior loads."""

from __future__ import annotations

from apa.priors.ddpm import load_prior
from apa.priors.unet import UNet, UNetConfig
from apa.training import ddpm
from apa.training.common import TrainConfig


def test_training_runs_resumes_and_exports_a_loadable_prior(tmp_path, mnist_arrays):
    small = UNetConfig(channels=(8, 8, 8), time_dim=16, groups=4)
    cfg = TrainConfig(steps=3, batch_size=4, checkpoint_every=1, warmup=1)
    ddpm.train_prior("mnist", tmp_path / "run", cfg, unet=small, progress=False, limit=64)
    assert (tmp_path / "run" / "loss.csv").read_text().count("\n") == 3
    ddpm.train_prior("mnist", tmp_path / "run", TrainConfig(steps=5, batch_size=4, checkpoint_every=1, warmup=1),
                     unet=small, progress=False, limit=64)
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5]
    out = ddpm.export_from_run("mnist", tmp_path / "run", tmp_path / "p.safetensors")
    assert isinstance(load_prior("mnist", out).model, UNet)
