"""A .beton is checked whole before FFCV reads it (issue 23): each crafted file is a one-line BetonError
naming the file and what is wrong, before anything is allocated or copied on its word; the FFCV cache
converts again a planted or edited file."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("ffcv", reason="ffcv is not installed (pip install fastssl[ffcv])")

from benchmarks.attacks_data import convert, make_image_folder, set_image_sizes, set_sample_count  # noqa: E402
from loaders import ffcv  # noqa: E402
from loaders.beton import BetonError, decode_all_images, read_beton_table  # noqa: E402


@pytest.fixture(scope="module")
def raw_beton(tmp_path_factory):
    """A valid .beton of 16 raw 24x24 records."""
    root = tmp_path_factory.mktemp("beton")
    return convert(make_image_folder(root / "images", classes=2, per_class=8), root / "valid.beton", write_mode="raw")


def _damaged(raw_beton, tmp_path, damage):
    beton = tmp_path / "damaged.beton"
    shutil.copyfile(raw_beton, beton)
    damage(beton)
    return beton


DAMAGE = {
    # the crash: metadata says 1x1 while each raw record holds 1,728 bytes (the copy overflowed)
    "raw records claim 1x1": (lambda b: set_image_sizes(b, height=1, width=1), "raw record's size is not height*width*3"),
    "records claim 64x64": (lambda b: set_image_sizes(b, height=64, width=64), "raw record's size is not"),
    "random bytes": (lambda b: b.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, np.uint8).tobytes()),
                     "not an FFCV .beton of format version 2"),
    "truncated": (lambda b: b.write_bytes(b.read_bytes()[: b.stat().st_size // 2]), "allocation table"),
    "header only": (lambda b: b.write_bytes(b.read_bytes()[:24]), "truncated: 24 bytes end inside the field"),
    "shorter than a header": (lambda b: b.write_bytes(b"\x02\x00"), "not a .beton: 2 bytes"),
    "2^34 samples claimed": (lambda b: set_sample_count(b, 1 << 34), "claims 17179869184 samples"),
    "empty": (lambda b: set_sample_count(b, 0), "holds no samples"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_beton_is_one_line_naming_the_file_and_what_is_wrong(raw_beton, tmp_path, kind):
    damage, message = DAMAGE[kind]
    beton = _damaged(raw_beton, tmp_path, damage)
    with pytest.raises(BetonError) as error:
        read_beton_table(beton)
    assert str(error.value).startswith(f"{beton}: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(BetonError):
        decode_all_images(beton, num_workers=1)  # FFCV's own reader and decoders never see it


def test_records_outside_the_data_pages_and_unordered_indices_are_refused(raw_beton, tmp_path):
    def pointer_past_the_table(beton):
        data = bytearray(beton.read_bytes())
        data[24 + 3 * 1041 + 5: 24 + 3 * 1041 + 13] = (1 << 40).to_bytes(8, "little")  # record 0's data_ptr
        beton.write_bytes(bytes(data))

    with pytest.raises(BetonError, match="sample 0: image pointer is not the record's allocation"):
        read_beton_table(_damaged(raw_beton, tmp_path, pointer_past_the_table))

    def swap_indices(beton):
        data = bytearray(beton.read_bytes())
        first, second = 24 + 3 * 1041 + 24, 24 + 3 * 1041 + 32 + 24
        data[first:first + 8], data[second:second + 8] = data[second:second + 8], data[first:first + 8]
        beton.write_bytes(bytes(data))

    with pytest.raises(BetonError, match="dataset indices are not increasing"):
        read_beton_table(_damaged(raw_beton, tmp_path, swap_indices))


def test_the_cache_converts_again_a_planted_file_and_an_edited_one(tmp_path, monkeypatch, caplog):
    """issue 23: a 64-record file planted at the cache path of a 2,000-image folder was used unchecked."""
    monkeypatch.setattr(ffcv.log, "propagate", True)  # caplog reads the root logger, whatever earlier tests set
    monkeypatch.setattr(ffcv.log, "disabled", False)
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path / "cache"))
    folder = make_image_folder(tmp_path / "folder", classes=2, per_class=20)
    few = make_image_folder(tmp_path / "few", classes=1, per_class=20)  # the folder's first 20 images, labels right

    def cached():
        return ffcv._beton_for(source="disk_folder", data_path=str(folder), synthetic_params=None,
                               max_resolution=32, num_workers=1)

    beton = cached()
    assert len(read_beton_table(beton).indices) == 40
    record = json.loads(beton.with_name(beton.name + ".json").read_text())
    assert record["records"] == 40 and record["beton_bytes"] == beton.stat().st_size
    # Reused as it is: no warning (INFO lines may be there when an earlier test set the root logger's level).
    assert cached() == beton and not [entry for entry in caplog.records if entry.levelno >= logging.WARNING]

    # Planted: a valid .beton of 20 of the 40 files, with a forged record of its conversion (the attacker can
    # write both): the files it lacks decode, so it is not this folder's conversion.
    convert(few, beton, write_mode="raw")
    beton.with_name(beton.name + ".json").write_text(json.dumps({**record, "records": 20,
        "beton_digest": ffcv._file_digest(beton), "beton_bytes": beton.stat().st_size}))
    with caplog.at_level(logging.WARNING):
        assert cached() == beton
    assert "holds 20 records for 40 files, and lacks" in caplog.text and "converting" in caplog.text
    assert len(read_beton_table(beton).indices) == 40

    # Edited in place (a byte of a record), the record of its conversion left as it was.
    caplog.clear()
    data = bytearray(beton.read_bytes())
    data[-2000] ^= 0xFF
    beton.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        cached()
    assert "is not the file that was converted" in caplog.text
    assert ffcv._file_digest(beton) == json.loads(beton.with_name(beton.name + ".json").read_text())["beton_digest"]

    # A changed image is a new key: its contents, not its name, make the cache's name.
    (folder / "class0" / "0000.jpg").write_bytes((folder / "class1" / "0000.jpg").read_bytes())
    assert cached() != beton
