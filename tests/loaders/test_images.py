"""Listing image folders and decoding any image to 8-bit RGB (loaders.images)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders import images
from loaders.images import UnreadableImage, check_images, list_images, list_samples, load_rgb, why_unreadable


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


def test_directory_links_into_a_loop_are_listed_once_and_counted(tmp_path, caplog):
    """Two links to `.` in a class folder listed its images 41 times, then filled the memory (issue 23)."""
    pixels = np.zeros((4, 4, 3), np.uint8)
    for name in ("cat/1.png", "cat/sub/2.png", "dog/3.png", "shared/4.png"):
        _save(tmp_path / name, pixels)
    root = tmp_path / "tree"
    root.mkdir()
    for name in ("cat", "dog"):
        os.symlink(tmp_path / name, root / name)  # class folders that are links are followed
    os.symlink(".", tmp_path / "cat" / "again")
    os.symlink(".", tmp_path / "cat" / "sub" / "again")
    os.symlink("..", tmp_path / "cat" / "sub" / "up")
    os.symlink(tmp_path / "shared", tmp_path / "dog" / "shared")  # a link to a folder not listed otherwise
    with caplog.at_level(logging.WARNING):
        paths, labels, _ = list_images(root, data_limit=-1)
    assert [p.split("tree/")[1] for p in paths] == ["cat/1.png", "cat/sub/2.png", "dog/3.png", "dog/shared/4.png"]
    assert labels == [0, 0, 1, 1]
    assert "skipped 3 directory link(s)" in caplog.text


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


def test_huge_images_load_reduced_and_those_over_the_pixel_limit_are_refused(tmp_path, monkeypatch):
    jpeg = _save(tmp_path / "huge.jpg", np.full((400, 600, 3), 90, np.uint8))
    png = _save(tmp_path / "huge.png", np.full((400, 600, 3), 90, np.uint8))
    # Scaled-down limits stand in for gigapixel files.
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 20000)
    for path in (jpeg, png):
        image = load_rgb(str(path))
        assert image.width * image.height <= 20000 and image.width / image.height == pytest.approx(1.5, rel=0.02)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", images.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    images.set_pixel_limit(100000)
    assert Image.MAX_IMAGE_PIXELS == 100000  # PIL's decompression-bomb guard is on, at the same limit
    for path in (jpeg, png):
        with pytest.raises(UnreadableImage, match="limit of (100000|200000)"):  # ours, or PIL's at twice it
            load_rgb(str(path))
        assert "limit of" in why_unreadable(str(path))


def test_a_decompression_bomb_is_a_counted_skip_under_the_default_limit(tmp_path, caplog):
    """A 16-bit PNG declaring 30000x30000 pixels (900 MP: 5.8 GB when decoded) is skipped unread."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    folder = tmp_path / "data" / "only"
    folder.mkdir(parents=True)
    header = struct.pack(">IIBBBBB", 30000, 30000, 16, 0, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    _save(folder / "good.png", np.zeros((8, 8, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        kept = check_images(list_samples(tmp_path / "data", data_limit=-1), num_workers=1, progress=False)
    assert [Path(p).name for p in kept.paths] == ["good.png"]
    assert "skipped 1 of 2" in caplog.text and "bomb.png (DecompressionBombError" in caplog.text
