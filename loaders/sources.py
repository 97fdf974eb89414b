"""Data sources: where the image folder of a source and split is."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loaders.fashion_mnist import ensure_fashion_mnist
from loaders.synthetic import ensure_synthetic_dataset

SOURCES = ("synthetic", "fashion_mnist", "disk_folder", "ffcv")  # ffcv: a .beton, read by the ffcv backend only
# The sources that need no path: fastssl writes their image folders into its cache.
BUILT_IN_SOURCES = ("synthetic", "fashion_mnist")
# The built-in dataset is a fixed benchmark: its content does not follow the training seed.
SYNTHETIC_SEED = 0


def resolve_image_folder(
    *, source: str, data_path: str | None, split: str, synthetic_params: dict[str, Any] | None
) -> Path:
    """The image folder of a source and split.

    synthetic: data_path, else synthetic_params["root"], is the dataset root (None or "": the default
        cache), generated on first use from synthetic_params {image_size, train_per_class, val_per_class}; split picks
        <root>/train or <root>/val.
    fashion_mnist: Debian's Fashion-MNIST written once into the cache as an image folder (train; val is its
        test split), the first synthetic_params["fashion_mnist"] {train_per_class, test_per_class} images of
        each class (-1: all).
    disk_folder: data_path is the folder of the requested split itself (VISSL's DATA_PATHS).
    """
    if source == "fashion_mnist":
        subset = (synthetic_params or {}).get("fashion_mnist") or {}
        root = ensure_fashion_mnist(train_per_class=subset.get("train_per_class", -1),
                                    test_per_class=subset.get("test_per_class", -1))
        return root / split
    if source == "synthetic":
        if not synthetic_params:
            raise ValueError("source synthetic needs synthetic_params {image_size, train_per_class, val_per_class}")
        root = ensure_synthetic_dataset(
            data_path or synthetic_params.get("root") or None,  # DATA.TRAIN.SYNTHETIC.ROOT
            image_size=synthetic_params["image_size"],
            train_per_class=synthetic_params["train_per_class"],
            val_per_class=synthetic_params["val_per_class"],
            seed=SYNTHETIC_SEED,
        )
        return root / split
    if source == "disk_folder":
        if not data_path:
            raise ValueError("source disk_folder needs a data path (DATA.TRAIN.DATA_PATHS)")
        return Path(data_path)
    raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
