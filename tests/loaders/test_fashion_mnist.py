"""Fashion-MNIST as a data source: idx files checked before use, a keyed, class-balanced image folder."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders import fashion_mnist
from loaders.fashion_mnist import CLASS_NAMES, FashionMnistError, ensure_fashion_mnist, read_split
from loaders.sources import resolve_image_folder


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """A small dataset in Fashion-MNIST's file format: 4 training and 2 test images per class."""
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    arrays = {}
    for split, per_class in (("train", 4), ("val", 2)):
        labels = np.tile(np.arange(10), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        image_name, label_name = fashion_mnist.FILES[split]
        write_idx(source / image_name, images, 2051)
        write_idx(source / label_name, labels, 2049)
        arrays[split] = (images, labels)
    monkeypatch.setenv("FASTSSL_FASHION_MNIST_DIR", str(source))
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path / "cache"))
    return source, arrays


def test_written_folder_holds_the_first_images_of_each_class_pixel_for_pixel(fake_dataset):
    _, arrays = fake_dataset
    root = ensure_fashion_mnist(train_per_class=3, test_per_class=-1)
    images, labels = arrays["train"]
    for label, name in enumerate(CLASS_NAMES):
        files = sorted((root / "train" / name).iterdir())
        assert len(files) == 3
        expected = images[np.flatnonzero(labels == label)[:3]]
        for file, want in zip(files, expected):
            assert np.array_equal(np.asarray(Image.open(file)), want)
        assert len(list((root / "val" / name).iterdir())) == 2
    # Reused as it is the second time; another subset is another folder.
    stamp = (root / fashion_mnist.MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_fashion_mnist(train_per_class=3, test_per_class=-1) == root
    assert (root / fashion_mnist.MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert ensure_fashion_mnist(train_per_class=2, test_per_class=1) != root
    assert resolve_image_folder(source="fashion_mnist", data_path=None, split="val",
                                synthetic_params={"fashion_mnist": {"train_per_class": 3, "test_per_class": -1}}) \
        == root / "val"


def test_missing_dataset_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FashionMnistError, match="apt-get install dataset-fashion-mnist"):
        read_split("train")


@pytest.mark.parametrize("damage", ["huge_dims", "wrong_magic", "truncated", "not_gzip", "bad_label"])
def test_damaged_idx_files_are_one_line_errors(fake_dataset, damage):
    source, arrays = fake_dataset
    image_file = source / fashion_mnist.FILES["train"][0]
    label_file = source / fashion_mnist.FILES["train"][1]
    if damage == "huge_dims":  # a header claiming 2^32-1 images of 28x28: refused before any allocation
        with gzip.open(image_file, "wb") as handle:
            handle.write((2051).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    elif damage == "wrong_magic":
        write_idx(image_file, arrays["train"][0], 2049)
    elif damage == "truncated":
        with gzip.open(image_file, "wb") as handle:
            handle.write((2051).to_bytes(4, "big"))
    elif damage == "not_gzip":
        image_file.write_bytes(b"not a gzip file at all")
    else:
        write_idx(label_file, np.full(40, 17), 2049)
    with pytest.raises(FashionMnistError) as error:
        read_split("train")
    assert "\n" not in str(error.value) and str(image_file.parent) in str(error.value)


def test_a_foreign_folder_is_never_overwritten(fake_dataset, tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FashionMnistError, match="not a Fashion-MNIST folder"):
        ensure_fashion_mnist(root, train_per_class=1, test_per_class=1)
    assert (root / "notes.txt").read_text() == "keep me"
    with pytest.raises(FashionMnistError, match="TRAIN_PER_CLASS=0"):
        ensure_fashion_mnist(train_per_class=0)


def test_training_without_the_package_is_a_one_line_error(tmp_path):
    environ = {**os.environ, "FASTSSL_FASHION_MNIST_DIR": str(tmp_path / "nowhere"),
               "FASTSSL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "fastssl.train", "config=pretrain/swav/swav_1node_cpu_resnet18",
                             "config.DATA.TRAIN.DATA_SOURCES=[fashion_mnist]", f"config.CHECKPOINT.DIR={tmp_path}/ck"],
                            capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "apt-get install dataset-fashion-mnist" in errors[0]


@pytest.mark.skipif(not Path(fashion_mnist.DEFAULT_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_the_real_test_split_is_balanced():
    os.environ.pop("FASTSSL_FASHION_MNIST_DIR", None)
    images, labels = read_split("val")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_the_demo_recipe_plans_its_fashion_mnist_run_without_reading_it(tmp_path):
    """--cfg job sizes the demo from FASHION_MNIST.TRAIN_PER_CLASS without the dataset being there."""
    environ = {**os.environ, "FASTSSL_FASHION_MNIST_DIR": str(tmp_path / "nowhere"),
               "FASTSSL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "fastssl.train", "config=pretrain/swav/swav_1node_cpu_fmnist_resnet18",
                             "--cfg", "job"], capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "# training samples: 50000" in result.stdout and "781 per epoch, 781 in all" in result.stdout
    assert not (tmp_path / "cache").exists()
