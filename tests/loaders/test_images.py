"""Listing image folders and decoding any image to 8-bit RGB (loaders.images)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loaders import images
from loaders.images import UnreadableImage, list_images, load_rgb


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
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(jpeg)
    for path in (jpeg, png):
        image = load_rgb(str(path))
        assert image.width * image.height <= 20000 and image.width / image.height == pytest.approx(1.5, rel=0.02)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the caller's limit is restored
    monkeypatch.setattr(images, "MAX_UNDRAFTABLE_PIXELS", 100000)
    with pytest.raises(UnreadableImage, match="too large"):
        load_rgb(str(png))
