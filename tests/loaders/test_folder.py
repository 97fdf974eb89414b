"""The reference loader's pieces: listing, fault-tolerant decoding, per-sample determinism, the sampler."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import folder
from loaders.folder import (
    EpochBatchSampler, ImageFiles, MultiCropFolder, UnreadableImage, list_images, load_rgb, sample_crop_params,
)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_list_images_class_folders_flat_folder_and_limit(tmp_path):
    pixels = np.zeros((4, 4, 3), np.uint8)
    for name in ("b/2.png", "b/1.jpg", "a/x.JPEG", "a/sub/y.png", "a/.hidden.jpg"):
        _save(tmp_path / "tree" / name, pixels)
    (tmp_path / "tree" / "a" / "notes.txt").write_text("not an image")
    paths, labels, classes = list_images(tmp_path / "tree", data_limit=-1)
    assert classes == ["a", "b"] and labels == [0, 0, 1, 1]
    assert [p.split("tree/")[1] for p in paths] == ["a/sub/y.png", "a/x.JPEG", "b/1.jpg", "b/2.png"]
    assert list_images(tmp_path / "tree", data_limit=3)[0] == paths[:3]
    for name in ("2.png", "1.png"):
        _save(tmp_path / "flat" / name, pixels)
    paths, labels, classes = list_images(tmp_path / "flat", data_limit=0)
    assert classes == [] and labels == [-1, -1] and paths[0].endswith("1.png")


def test_missing_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere") as missing:
        list_images(tmp_path / "nowhere", data_limit=-1)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty") as empty:
        list_images(tmp_path / "empty", data_limit=-1)
    assert "\n" not in str(missing.value) + str(empty.value)


def test_load_rgb_converts_modes(tmp_path):
    grey = _save(tmp_path / "grey.png", np.full((5, 6), 77, np.uint8))
    sixteen = _save(tmp_path / "sixteen.png", np.array([[0, 32768, 65535]], np.uint16))
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    rgba = _save(tmp_path / "rgba.png", np.dstack([np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4), np.uint8)]))
    palette = tmp_path / "palette.png"
    Image.new("P", (4, 4), 3).save(palette, transparency=0)
    for path in (grey, sixteen, cmyk, rgba, palette):
        assert load_rgb(str(path)).mode == "RGB"
    assert np.asarray(load_rgb(str(grey)))[0, 0].tolist() == [77, 77, 77]
    # 16 bits are scaled to 8 (PIL's own convert would clip 32768 and 65535 to 255).
    assert np.asarray(load_rgb(str(sixteen)))[0, :, 0].tolist() == [0, 128, 255]
    red = np.asarray(load_rgb(str(cmyk)))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert np.asarray(load_rgb(str(rgba)))[0, 0].tolist() == [200, 200, 200]


def test_load_rgb_rejects_what_cannot_be_decoded(tmp_path):
    good = _save(tmp_path / "good.jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not a PNG")
    corrupt = bytearray(good.read_bytes())
    corrupt[20:200] = b"\xff" * 180
    (tmp_path / "corrupt.jpg").write_bytes(bytes(corrupt))
    for name in ("truncated.jpg", "empty.jpg", "text.png", "corrupt.jpg"):
        with pytest.raises(UnreadableImage):
            load_rgb(str(tmp_path / name))


def test_huge_images_load_reduced(tmp_path, monkeypatch):
    jpeg = _save(tmp_path / "huge.jpg", np.full((400, 600, 3), 90, np.uint8))
    png = _save(tmp_path / "huge.png", np.full((400, 600, 3), 90, np.uint8))
    # Scaled-down limits stand in for gigapixel files: PIL alone raises DecompressionBombError here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(folder, "MAX_DECODED_PIXELS", 20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(jpeg)
    for path in (jpeg, png):
        image = load_rgb(str(path))
        assert image.width * image.height <= 20000 and image.width / image.height == pytest.approx(1.5, rel=0.02)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the caller's limit is restored
    monkeypatch.setattr(folder, "MAX_UNDRAFTABLE_PIXELS", 100000)
    with pytest.raises(UnreadableImage, match="too large"):
        load_rgb(str(png))


def test_bad_files_are_replaced_by_the_next_readable_one(tmp_path):
    for i in range(4):
        _save(tmp_path / "c" / f"{i}.png", np.full((4, 4, 3), i, np.uint8))
    (tmp_path / "c" / "1.png").write_bytes(b"")
    (tmp_path / "c" / "3.png").write_text("nope")
    files = ImageFiles(tmp_path, data_limit=-1)
    _, used, failed = files.load(1)
    assert used == 2 and failed == (str(tmp_path / "c" / "1.png"),)
    _, used, failed = files.load(3)  # wraps around to the start
    assert used == 0 and failed == (str(tmp_path / "c" / "3.png"),)
    assert files.load(1)[1:] == (2, (str(tmp_path / "c" / "1.png"),))  # remembered, still reported
    assert files.load(2)[1:] == (2, ())
    for i in (0, 2):
        (tmp_path / "c" / f"{i}.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not one of 4 files"):
        ImageFiles(tmp_path, data_limit=-1).load(0)


def test_sample_crop_params_respect_bounds():
    rng = random.Random(0)
    for _ in range(300):
        top, left, h, w = sample_crop_params(50, 70, scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3), rng=rng)
        assert 0 <= top <= 50 - h and 0 <= left <= 70 - w
        assert 0.05 - 0.01 <= h * w / 3500 <= 0.14 + 0.01
    assert sample_crop_params(10, 1000, scale=(0.9, 1), ratio=(3 / 4, 4 / 3), rng=rng) == (0, 493, 10, 13)


def test_sample_augmentation_depends_only_on_seed_epoch_index(tiny_root, small_recipe):
    dataset = MultiCropFolder(tiny_root / "train", recipe=small_recipe, seed=3, data_limit=-1)
    first = dataset[(5, 0)]
    dataset[(9, 0)]  # other work in between must not matter
    again = MultiCropFolder(tiny_root / "train", recipe=small_recipe, seed=3, data_limit=-1)[(5, 0)]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert [tuple(c.shape) for c in first[0]] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
    assert first[1:] == (5, dataset.files.labels[5], ())
    next_epoch = dataset[(5, 1)]
    assert not torch.equal(first[0][0], next_epoch[0][0])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_without_overlap(world_size):
    def rank_batches(rank, drop_last):
        sampler = EpochBatchSampler(
            23, batch_size=4, drop_last=drop_last, shuffle=True, seed=1, rank=rank, world_size=world_size
        )
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(epoch == 2 for batch in batches for _, epoch in batch)
        return [[index for index, _ in batch] for batch in batches]

    dropped = [sum(rank_batches(r, True), []) for r in range(world_size)]
    assert all(len(d) == 23 // (4 * world_size) * 4 for d in dropped)  # full batches only, equal per rank
    flat = sum(dropped, [])
    assert len(flat) == len(set(flat))
    padded = [sum(rank_batches(r, False), []) for r in range(world_size)]
    assert len({len(p) for p in padded}) == 1  # equal per rank: same number of steps
    assert set(sum(padded, [])) == set(range(23))  # nothing lost
    assert len(sum(padded, [])) - 23 == (-23) % world_size  # padding repeats only the wrap-around


def test_sampler_epochs_and_resume():
    sampler = EpochBatchSampler(30, batch_size=4, drop_last=True, shuffle=True, seed=0, rank=0, world_size=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == epoch0[5:]
    sequential = EpochBatchSampler(10, batch_size=4, drop_last=False, shuffle=False, seed=0, rank=0, world_size=1)
    assert [[i for i, _ in batch] for batch in sequential] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="do not fill one batch"):
        EpochBatchSampler(7, batch_size=4, drop_last=True, shuffle=True, seed=0, rank=0, world_size=2)


def test_numpy_blur_matches_torchvision():
    import torchvision.transforms.functional as TF

    pixels = np.random.default_rng(0).random((12, 9, 3), dtype=np.float32)
    expected = TF.gaussian_blur(torch.from_numpy(pixels).permute(2, 0, 1), [7, 7], [1.3, 1.3])
    result = torch.from_numpy(folder.gaussian_blur(pixels, sigma=1.3, kernel_size=7)).permute(2, 0, 1)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
