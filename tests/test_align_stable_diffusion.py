"""`apa align --prior sd15` end to end on tiny random models: two rounds with the CLIP user and with
the ImageNet user, through the command line's Python entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from apa.compat import ensure_torchvision

ensure_torchvision()  # before anything imports torchvision
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("apa.session")
pytest.importorskip("apa.evaluation.report")  # `apa align` writes its report with it
cli = pytest.importorskip("apa.cli")

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_models import make_tiny_open_clip, make_tiny_sd  # noqa: E402

TWO_ROUNDS = ["--height", "16", "--width", "16", "--particles", "4", "--steps", "3", "--per-round", "2",
              "--budget", "4", "--epochs", "3", "--eval-samples", "4", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only spin-waits


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def _check_session(out: Path, feedback: str) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["prior"]["name"] == "sd15" and config["feedback"]["name"] == feedback
    with __import__("numpy").load(out / "final_samples.npz") as f:
        assert f["images"].shape == (4, 3, 16, 16)


def test_align_stable_diffusion_with_clip_users(tiny_sd, tmp_path, capsys):
    pytest.importorskip("open_clip")
    config, weights = make_tiny_open_clip(tmp_path / "clip")
    out = tmp_path / "session"
    code = cli.main(["align", "--prior", "sd15", "--model", str(tiny_sd), "--feedback", "clip",
                     "--clip-model", str(config), "--clip-weights", str(weights), "--users", "apple,banana",
                     "--out", str(out), *TWO_ROUNDS])
    assert code == 0, capsys.readouterr().err
    _check_session(out, "clip")


def test_align_stable_diffusion_with_imagenet_users(tiny_sd, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "session"
    code = cli.main(["align", "--prior", "sd15", "--model", str(tiny_sd), "--feedback", "imagenet",
                     "--users", "Granny Smith,banana", "--surrogate", "pixels", "--out", str(out), *TWO_ROUNDS])
    assert code == 0, capsys.readouterr().err
    _check_session(out, "imagenet")


def test_align_stable_diffusion_missing_weights_is_one_message(tmp_path, capsys):
    code = cli.main(["align", "--prior", "sd15", "--model", str(tmp_path / "no-such-folder"), "--feedback", "clip",
                     "--out", str(tmp_path / "session"), *TWO_ROUNDS])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "no-such-folder") in err and "huggingface-cli download" in err
