"""Fashion-MNIST (Xiao et al. 2017) as an image folder: real images, offline, for every backend.

Debian's ``dataset-fashion-mnist`` ships the four gzip'd idx files (60,000 training and 10,000 test images,
28x28 grey, 10 classes). They are written once into the cache as an ImageFolder of PNG files
(``<root>/train/<class>/00000.png`` and ``<root>/val/<class>/...`` for the test split), so the torchvision,
DALI and FFCV backends all decode real encoded files. A class-balanced subset (the first N images of each
class, in the files' order) is its own keyed folder. Generation writes to a temporary sibling folder and
renames it into place, with a manifest; a folder is reused only when its manifest matches.

The idx files are checked against their own sizes before anything is allocated: a damaged or crafted file is
a one-line error, never a large allocation.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from loaders.cache import cache_dir

log = logging.getLogger(__name__)

# The directory Debian's package installs; FASTSSL_FASHION_MNIST_DIR overrides it (tests, other installs).
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPLIT_SIZES = {"train": 60_000, "val": 10_000}
MANIFEST_NAME = "fastssl-fashion-mnist.json"
_VERSION = 1
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
_MAX_GZ_BYTES = 64 << 20  # the unpacked training images are 47 MB


class FashionMnistError(ValueError):
    """The dataset is missing or its files are damaged (one line, naming the file)."""


def source_dir() -> Path:
    return Path(os.environ.get("FASTSSL_FASHION_MNIST_DIR") or DEFAULT_DIR)


def ensure_fashion_mnist(root: str | os.PathLike | None = None, *, train_per_class: int = -1,
                         test_per_class: int = -1) -> Path:
    """Return the root of the Fashion-MNIST image folder, writing it first if needed.

    train_per_class / test_per_class: the first N images of each class (-1: all, 6,000 and 1,000).
    root: where to keep it; None: $FASTSSL_CACHE (or ~/.cache/fastssl)/fashion-mnist-<subset>. A non-empty
    root without a matching manifest is refused, so nothing of the user's is overwritten.
    """
    for name, count in (("TRAIN_PER_CLASS", train_per_class), ("TEST_PER_CLASS", test_per_class)):
        if int(count) == 0 or int(count) < -1:
            raise FashionMnistError(f"fashion_mnist: {name}={count}; give a positive count of images a class, or -1 "
                                    "for all")
    params = {"version": _VERSION, "train_per_class": int(train_per_class), "test_per_class": int(test_per_class),
              "classes": list(CLASS_NAMES)}
    if root is None:
        subset = "-".join("all" if n < 0 else str(n) for n in (train_per_class, test_per_class))
        root = cache_dir() / f"fashion-mnist-{subset}-v{_VERSION}"
    root = Path(root).expanduser()
    if _read_manifest(root) == params:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FashionMnistError(f"fashion_mnist: {root} exists and is not a Fashion-MNIST folder written by fastssl "
                                f"(no matching {MANIFEST_NAME}); choose another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, per_class in (("train", train_per_class), ("val", test_per_class)):
            images, labels = read_split(split)
            _write_split(staging / split, images, labels, per_class)
        (staging / MANIFEST_NAME).write_text(json.dumps(params, indent=1))
        if root.exists():
            root.rmdir()  # empty (checked above)
        try:
            os.rename(staging, root)
        except OSError:  # another rank won the race
            if _read_manifest(root) != params:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Fashion-MNIST ready at %s", root)
    return root


def read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of a split ('train' or 'val', the test split)."""
    directory = source_dir()
    image_file, label_file = (directory / name for name in FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FashionMnistError(f"fashion_mnist: {path} not found; install the dataset with `{INSTALL_HINT}` "
                                    "(or set FASTSSL_FASHION_MNIST_DIR)")
    images = _read_idx(image_file, magic=_IMAGE_MAGIC, ndim=3)
    labels = _read_idx(label_file, magic=_LABEL_MAGIC, ndim=1)
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise FashionMnistError(f"fashion_mnist: {image_file} holds {images.shape} images for {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise FashionMnistError(f"fashion_mnist: {label_file} has label {labels.max()}, beyond the 10 classes")
    return images, labels.astype(np.int64)


def _read_idx(path: Path, *, magic: int, ndim: int) -> np.ndarray:
    """An idx file (big-endian magic, dimensions, uint8 data), its sizes checked before the data is used."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read(_MAX_GZ_BYTES + 1)
    except (OSError, EOFError) as error:
        raise FashionMnistError(f"fashion_mnist: cannot read {path}: {error}") from None
    header = 4 + 4 * ndim
    if len(raw) > _MAX_GZ_BYTES or len(raw) < header:
        raise FashionMnistError(f"fashion_mnist: {path} is not an idx file of the expected size ({len(raw)} bytes)")
    found_magic = int.from_bytes(raw[:4], "big")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if found_magic != magic or int(np.prod(dims, dtype=np.int64)) != len(raw) - header:
        raise FashionMnistError(f"fashion_mnist: {path} has magic {found_magic} and dimensions {dims} for "
                                f"{len(raw) - header} data bytes (expected magic {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _write_split(directory: Path, images: np.ndarray, labels: np.ndarray, per_class: int) -> None:
    for label, name in enumerate(CLASS_NAMES):
        indices = np.flatnonzero(labels == label)
        if per_class >= 0:
            indices = indices[:per_class]
        class_dir = directory / name
        class_dir.mkdir(parents=True)
        for position, index in enumerate(indices):
            Image.fromarray(images[index], mode="L").save(class_dir / f"{position:05d}.png", compress_level=1)


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
