"""The built-in synthetic dataset: layout, determinism, caching, atomicity, class evidence."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from loaders import synthetic
from loaders.synthetic import CLASS_NAMES, MANIFEST_NAME, draw_image, ensure_synthetic_dataset

PARAMS = dict(image_size=24, train_per_class=3, val_per_class=1)


def test_layout_and_reuse(tiny_root):
    for split, count in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (tiny_root / split).iterdir()) == sorted(CLASS_NAMES)
        images = sorted((tiny_root / split).rglob("*.jpg"))
        assert len(images) == 10 * count
        with Image.open(images[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    manifest = json.loads((tiny_root / MANIFEST_NAME).read_text())
    assert manifest["image_size"] == 32 and manifest["train_per_class"] == 4
    stamp = (tiny_root / "train" / "circle" / "00000.jpg").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tiny_root, image_size=32, train_per_class=4, val_per_class=2, seed=0) == tiny_root
    assert (tiny_root / "train" / "circle" / "00000.jpg").stat().st_mtime_ns == stamp  # reused, not redrawn


def test_deterministic_from_seed(tmp_path):
    first = ensure_synthetic_dataset(tmp_path / "a", seed=5, **PARAMS)
    second = ensure_synthetic_dataset(tmp_path / "b", seed=5, **PARAMS)
    other = ensure_synthetic_dataset(tmp_path / "c", seed=6, **PARAMS)
    name = "train/star/00002.jpg"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / name).read_bytes() != (other / name).read_bytes()


def test_default_root_and_new_params_beside(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic_dataset(seed=0, **PARAMS)
    assert root.parent == tmp_path / "cache" and "24px" in root.name
    changed = ensure_synthetic_dataset(seed=0, image_size=24, train_per_class=2, val_per_class=1)
    assert changed.parent == root.parent and len(list((changed / "train" / "ring").iterdir())) == 2
    assert sorted(p.name for p in root.parent.iterdir()) == sorted([root.name, changed.name])  # nothing staged left


def test_changing_the_parameters_under_a_root_deletes_nothing(tmp_path):
    """SYNTHETIC.ROOT holds one folder per parameters: the user's files there, and in a dataset folder, stay."""
    root = tmp_path / "data"
    first = ensure_synthetic_dataset(root, seed=0, **PARAMS)
    (root / "thesis.tex").write_text("precious")
    (first / "notes.txt").write_text("mine")
    second = ensure_synthetic_dataset(root, seed=0, image_size=24, train_per_class=2, val_per_class=1)
    assert first.parent == second.parent == root and first != second
    assert (root / "thesis.tex").read_text() == "precious" and (first / "notes.txt").read_text() == "mine"
    assert len(list((second / "train" / "ring").iterdir())) == 2
    assert len(list((first / "train" / "ring").iterdir())) == 3
    assert ensure_synthetic_dataset(first, seed=0, **PARAMS) == first  # a dataset folder named directly


def test_only_a_dataset_folder_with_fastssls_manifest_is_replaced(tmp_path):
    root = tmp_path / "data"
    first = ensure_synthetic_dataset(root, seed=0, **PARAMS)
    manifest = json.loads((first / MANIFEST_NAME).read_text())
    (first / MANIFEST_NAME).write_text(json.dumps({**manifest, "classes": ["older"]}))  # an older generator's
    assert ensure_synthetic_dataset(root, seed=0, **PARAMS) == first
    assert json.loads((first / MANIFEST_NAME).read_text()) == manifest
    (first / MANIFEST_NAME).unlink()  # a folder at that name that fastssl did not write
    with pytest.raises(ValueError, match="without"):
        ensure_synthetic_dataset(root, seed=0, **PARAMS)
    assert (first / "train").is_dir()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_draw(name, *, size, rng):
        calls.append(name)
        if len(calls) > 5:
            raise KeyboardInterrupt  # a killed run
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(synthetic, "draw_image", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path / "data", seed=0, **PARAMS)
    assert list((tmp_path / "data").iterdir()) == []


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    key = "synthetic-24px-3x1-seed0-v2"
    (tmp_path / "mine" / key).mkdir()
    (tmp_path / "mine" / key / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="without"):
        ensure_synthetic_dataset(tmp_path / "mine", seed=0, **PARAMS)
    assert (tmp_path / "mine" / key / "thesis.tex").read_text() == "precious"


def test_class_is_not_in_the_colour():
    """Nearest-centroid classification on mean colour must be near chance (10%): the class lives
    in the shape and texture only, so colour-invariant features are needed."""
    def mean_colours(offset):
        return np.array([
            [draw_image(name, size=24, rng=np.random.default_rng([9, label, offset + i])).reshape(-1, 3).mean(0)
             for i in range(30)]
            for label, name in enumerate(CLASS_NAMES)
        ])  # (classes, images, 3)

    centroids = mean_colours(0).mean(axis=1)
    test = mean_colours(1000)
    predicted = np.linalg.norm(test[:, :, None, :] - centroids[None, None], axis=-1).argmin(-1)
    accuracy = (predicted == np.arange(10)[:, None]).mean()
    assert accuracy < 0.25


def test_class_is_in_the_structure():
    """Leave-one-out 1-NN on a colour-free feature (a gradient-orientation histogram) is far
    above chance: the class evidence is there for colour-invariant features to find."""
    def orientation_histogram(pixels):
        gy, gx = np.gradient(pixels.astype(np.float32).mean(-1))
        magnitude = np.hypot(gx, gy)
        angle = np.arctan2(gy, gx) % (np.pi / 2)  # invariant to flips and to light-on-dark vs dark-on-light
        histogram, _ = np.histogram(angle, bins=8, range=(0, np.pi / 2), weights=magnitude)
        return np.concatenate([histogram / (histogram.sum() + 1e-9), [(magnitude > magnitude.mean()).mean()]])

    features = np.array([
        orientation_histogram(draw_image(name, size=48, rng=np.random.default_rng([1, label, i])))
        for label, name in enumerate(CLASS_NAMES) for i in range(20)
    ])
    labels = np.repeat(np.arange(10), 20)
    distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(1)] == labels).mean() > 0.35


def test_muted_light_on_dark():
    """The design the demo relies on: muted colours (chroma bounded by MAX_SATURATION, plus a
    little noise) and a light foreground on a dark background, for every class."""
    for label, name in enumerate(CLASS_NAMES):
        for i in range(5):
            pixels = draw_image(name, size=32, rng=np.random.default_rng([3, label, i])).astype(np.float32) / 255
            chroma = pixels.max(-1) - pixels.min(-1)  # HSV saturation times value
            assert np.percentile(chroma, 95) < synthetic.MAX_SATURATION + 0.08
            luma = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
            dark, light = np.percentile(luma, [10, 90])
            assert dark < 0.4 and light > 0.6


def test_staging_left_by_a_killed_generation_is_removed_and_nothing_else(tmp_path):
    """issue 23: TRAIN_PER_CLASS=1e7 killed mid-generation left 575 MB of staging behind for ever."""
    import os
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer exists
    mark = synthetic._STAGING_MARK
    left = {"dead": {"host": socket.gethostname(), "pid": dead.pid},
            "alive": {"host": socket.gethostname(), "pid": os.getpid()},
            "other_host": {"host": "another-node", "pid": dead.pid}}
    # The dataset folder is named for its settings inside the given root; staging sits beside it.
    parent = tmp_path / "data"
    parent.mkdir()
    name = (f"synthetic-{PARAMS['image_size']}px-{PARAMS['train_per_class']}x{PARAMS['val_per_class']}-seed0-"
            f"v{synthetic._GENERATOR_VERSION}")
    for key, content in left.items():
        (parent / f".{name}.tmp-{key}").mkdir()
        (parent / f".{name}.tmp-{key}" / mark).write_text(json.dumps(content))
    (parent / f".{name}.tmp-unmarked").mkdir()  # not fastssl's mark: left alone
    (parent / f".{name}.tmp-unmarked" / "notes.txt").write_text("mine")
    root = ensure_synthetic_dataset(parent, seed=0, **PARAMS)
    assert root == parent / name
    assert sorted(p.name for p in parent.iterdir()) == [
        f".{name}.tmp-alive", f".{name}.tmp-other_host", f".{name}.tmp-unmarked", name]
    assert (root / "train" / "ring").is_dir()


def test_a_dataset_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(ValueError, match=r"synthetic dataset: 40 images of 24 px need about 0\.0 GB; .* has 0\.0 GB free"):
        ensure_synthetic_dataset(tmp_path / "data", seed=0, **PARAMS)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # nothing written
