"""The OpenCLIP prompt-bank user: its arithmetic by hand, and the real loader on a tiny random open_clip model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apa.compat import ensure_torchvision
from apa.errors import WeightsNotFoundError
from apa.feedback import clip as clip_mod
from apa.registry import FEEDBACK

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
ensure_torchvision()  # before anything imports torchvision (open_clip does)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only spin-waits


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("open_clip")
    from tiny_models import make_tiny_open_clip

    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_clip_softmax_over_the_bank_by_hand():
    image = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # unit directions (1, 0) and (0, 1)
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # cosines with (1,0): 1, 0, 1/√2
    probs = clip_mod.prompt_probabilities(image, text, temperature=10.0)
    c = 1 / math.sqrt(2)
    z0 = math.exp(10) + math.exp(0) + math.exp(10 * c)
    z1 = math.exp(0) + math.exp(10) + math.exp(10 * c)
    expected = torch.tensor([[math.exp(10) / z0, 1 / z0, math.exp(10 * c) / z0],
                             [1 / z1, math.exp(10) / z1, math.exp(10 * c) / z1]])
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)
    assert probs[0].tolist() == pytest.approx([0.94922, 0.0000431, 0.05074], rel=1e-3)
    flat = clip_mod.prompt_probabilities(image, text, temperature=0.0)
    torch.testing.assert_close(flat, torch.full((2, 3), 1 / 3))


def test_clip_union_is_the_max_over_users():
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.1, 0.7]])
    torch.testing.assert_close(clip_mod.union_scores(probs, [0, 2]), torch.tensor([0.5, 0.3, 0.7]))
    torch.testing.assert_close(clip_mod.union_scores(probs, [1]), torch.tensor([0.2, 0.6, 0.1]))


def test_clip_bank_and_options():
    names, prompts, index = clip_mod.build_bank(["apple", "a photo of a dog", "kiwi"], clip_mod.ClipOptions().prompts)
    assert prompts[index[0]] == "a photo of an apple" and names[index[1]] == "dog"
    assert prompts[index[2]] == "a photo of a kiwi" and len(prompts) == len(clip_mod.DEFAULT_PROMPTS) + 1
    assert clip_mod.user_prompt("orange") == "a photo of an orange"
    opts = clip_mod.ClipOptions.from_dict({"users": "apple, banana", "temperature": 5, "clip_weights": None})
    assert opts.users == ("apple", "banana") and opts.temperature == 5 and opts.clip_weights is None
    foreign = clip_mod.ClipOptions.from_dict({"name": "clip", "prefer": (1, 4, 7, 9), "oracle_weights": None})
    assert foreign.users == ("apple", "grape", "banana")  # the oracle's keys are not the CLIP user's
    assert clip_mod.ClipOptions().users == ("apple", "grape", "banana") and clip_mod.ClipOptions().temperature == 10.0
    assert clip_mod.parse_prompts("x=a photo of x; y=a photo of y") == (("x", "a photo of x"), ("y", "a photo of y"))
    assert clip_mod.parse_prompts({"x": "px", "y": "py"}) == (("x", "px"), ("y", "py"))
    assert clip_mod.parse_prompts(["px", "py"]) == (("px", "px"), ("py", "py"))
    with pytest.raises(ValueError, match="at least two prompts"):
        clip_mod.parse_prompts(["only one"])
    with pytest.raises(ValueError, match="at least one user"):
        clip_mod.ClipOptions.from_dict({"users": " , "})


def test_clip_user_on_tiny_open_clip_matches_manual_scores(tiny_clip):
    import open_clip

    config, weights = tiny_clip
    user = FEEDBACK.create("clip", {"clip_model": str(config), "clip_weights": str(weights), "device": "cpu",
                                    "users": "apple,kiwi", "temperature": 10.0}, None)
    assert user.scale == (0.0, 1.0)  # scores are probabilities
    assert user.name == "clip[apple,kiwi]" and user.prompts[user.user_index[1]] == "a photo of a kiwi"
    images = torch.rand(5, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    scores = user(images)
    assert scores.shape == (5,) and bool(((scores >= 0) & (scores <= 1)).all())
    probs = user.probabilities(images)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    # by hand: open_clip's model on the preprocessed images and the tokenised bank
    model = open_clip.create_model(config.stem, pretrained=str(weights)).eval()
    tok = open_clip.get_tokenizer(config.stem)
    with torch.no_grad():
        x = clip_mod.preprocess(images, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(user.prompts)), dim=-1)
    expected = torch.softmax(10.0 * img @ txt.T, dim=-1)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores, expected[:, user.user_index].max(1).values, rtol=1e-4, atol=1e-6)
    report = user.evaluate(images)
    assert report["n"] == 5 and set(report["user_mean_scores"]) == {"apple", "kiwi"}
    top = expected.argmax(1)
    assert report["preferred_share"] == pytest.approx(float(torch.isin(top, torch.tensor(user.user_index)).float().mean()))
    assert report["confident_share"] == pytest.approx(float((top != user.names.index("noise")).float().mean()))
    assert sum(report["class_histogram"].values()) == 5


def test_clip_report_shares_by_hand():
    from apa.feedback.shares import first_match, preference_report

    top = torch.tensor([0, 2, 5, 2, 7])
    who = first_match(top, [[0], [2, 5]])
    assert who.tolist() == [0, 1, 1, 1, -1]
    confident = torch.tensor([True, True, False, True, True])
    rep = preference_report(who, confident, ["apple", "grape"], torch.tensor([0.5, 0.2, 0.3, 0.4, 0.1]))
    assert rep["preferred_share"] == 0.8 and rep["confident_share"] == 0.8
    assert rep["preferred_confident_share"] == 0.6 and rep["mean_score"] == pytest.approx(0.3)
    assert rep["preferred_class_shares"] == {"apple": pytest.approx(1 / 3), "grape": pytest.approx(2 / 3)}


def test_clip_preprocess_resizes_crops_and_accepts_grey():
    x = torch.rand(2, 1, 40, 60)
    out = clip_mod.preprocess(x, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (2, 3, 32, 32)
    const = clip_mod.preprocess(torch.full((1, 3, 50, 30), 0.75), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(const, torch.ones(1, 3, 32, 32), rtol=1e-4, atol=1e-4)


def test_clip_weights_from_a_folder(tiny_clip, tmp_path):
    config, weights = tiny_clip
    (tmp_path / "open_clip_model.safetensors").write_bytes(weights.read_bytes())
    assert clip_mod.find_clip_weights(config.stem, "openai", str(tmp_path)) == tmp_path / "open_clip_model.safetensors"
    user = clip_mod.make_clip({"clip_model": str(config), "clip_weights": str(tmp_path), "device": "cpu"})
    assert user(torch.rand(2, 3, 32, 32)).shape == (2,)


def test_clip_found_in_hf_cache(tiny_clip, tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / "0123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert clip_mod.find_clip_weights("ViT-L-14", "openai", None) == snap / "open_clip_model.safetensors"


def test_clip_missing_weights_error_names_every_path(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsNotFoundError) as info:
        FEEDBACK.create("clip", {"device": "cpu"}, None)
    msg = str(info.value)
    assert "OpenCLIP ViT-L-14 (openai)" in msg
    assert str(tmp_path / "hub" / "models--timm--vit_large_patch14_clip_224.openai") in msg
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-L-14.pt") in msg
    assert "huggingface-cli download timm/vit_large_patch14_clip_224.openai" in msg and "--clip-weights" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        clip_mod.find_clip_weights("ViT-L-14", "openai", str(tmp_path / "nope.safetensors"))


def test_clip_stack_imports_only_when_used():
    """Importing apa and its backends loads neither open_clip nor diffusers; the compat shim makes
    torchvision importable next to a CPU-only torch."""
    code = ("import sys, apa, apa.registry, apa.feedback.clip, apa.priors.stable_diffusion, apa.feedback.imagenet\n"
            "assert not {'open_clip', 'diffusers', 'transformers', 'torchvision'} & set(sys.modules), sys.modules.keys()\n"
            "from apa.compat import ensure_torchvision\n"
            "ensure_torchvision(); ensure_torchvision()\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('open_clip'):\n"
            "    import torchvision, open_clip\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
