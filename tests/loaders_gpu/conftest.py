"""Fixtures of the DALI/FFCV backend tests: a tiny image folder, and one full of bad input."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders.recipe import recipe_from_transforms

# Readable files of make_bad_folder, and how many of its image-named files must be skipped.
BAD_FOLDER_READABLE = ("good.jpg", "gray.jpg", "cmyk.jpg", "sixteen.png", "big.jpg", "palette.png")
BAD_FOLDER_SKIPPED = ("corrupt.jpg", "truncated.jpg", "empty.jpg", "text.png", "bomb.png")


def make_tiny_folder(root: Path, *, classes: int = 3, per_class: int = 6, seed: int = 0) -> Path:
    """An ImageFolder of per_class JPEGs per class, sizes 20..40 px, random content."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        directory = root / f"class{label}"
        directory.mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(20, 41, size=2)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"{i:03d}.jpg", quality=90)
    return root


def _png_header_only(path: Path, *, width: int, height: int) -> None:
    """A PNG declaring width x height pixels with no pixel data: a decompression bomb to open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def make_bad_folder(root: Path) -> Path:
    """One class folder with every kind of bad input next to readable oddities, plus a non-image."""
    directory = root / "only"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "good.jpg", quality=90)
    Image.fromarray(pixels[..., 0]).save(directory / "gray.jpg", quality=90)
    Image.fromarray(pixels).convert("CMYK").save(directory / "cmyk.jpg", quality=90)
    Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)).save(directory / "sixteen.png")
    Image.fromarray(np.full((1200, 1600, 3), 90, np.uint8)).save(directory / "big.jpg", quality=80)
    Image.fromarray(pixels).convert("P").save(directory / "palette.png")
    good = (directory / "good.jpg").read_bytes()
    (directory / "corrupt.jpg").write_bytes(bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))
    (directory / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "text.png").write_text("not an image at all\n")
    _png_header_only(directory / "bomb.png", width=40000, height=40000)
    (directory / "notes.txt").write_text("not listed: no image extension\n")
    return root


SWAV_TINY_TRANSFORMS = [
    {"name": "ImgPilToMultiCrop", "total_num_crops": 4, "size_crops": [24, 12], "num_crops": [2, 2],
     "crop_scales": [[0.14, 1.0], [0.05, 0.14]]},
    {"name": "RandomHorizontalFlip", "p": 0.5},
    {"name": "ImgPilColorDistortion", "strength": 1.0},
    {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
    {"name": "ImgPilRandomSolarize", "p": 0.2},
    {"name": "ToTensor"},
    {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def bad_folder(tmp_path_factory) -> Path:
    return make_bad_folder(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="session")
def tiny_recipe():
    return recipe_from_transforms(SWAV_TINY_TRANSFORMS)


def pytest_collection_modifyitems(config, items):
    # numba (0.6x) warns from a finalizer when FFCV's per-loader compiled functions are
    # garbage-collected; harmless (a warning only, raised at whatever test runs the collector).
    for item in items:
        if "loaders_gpu" in str(item.path):
            item.add_marker(pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"))

