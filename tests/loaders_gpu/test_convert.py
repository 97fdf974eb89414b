"""fastssl-convert: folder -> .beton, read-back verification, bad input, one-line errors."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import BAD_FOLDER_READABLE, BAD_FOLDER_SKIPPED

pytest.importorskip("ffcv", reason="ffcv is not installed (pip install fastssl[ffcv])")

from loaders.convert import main  # noqa: E402
from loaders.beton import read_beton_table  # noqa: E402


def test_convert_verify_and_read_back(tiny_folder, tmp_path, caplog):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor

    from loaders.beton import PaddedRGBDecoder, read_rgb
    from loaders.images import list_samples

    output = tmp_path / "out" / "tiny.beton"
    with caplog.at_level(logging.INFO):
        main([str(tiny_folder), str(output), "--max-resolution", "32", "--write-mode", "proportion",
              "--compress-probability", "0.5", "--num-workers", "1", "--verify", "--no-progress"])
    assert "verified" in caplog.text
    assert [p.name for p in output.parent.iterdir()] == ["tiny.beton"]  # no temporary file left behind
    table = read_beton_table(output)
    assert np.array_equal(table.indices, np.arange(18)) and np.array_equal(table.labels, np.arange(18) // 6)
    assert table.heights.max() <= 32 and table.widths.max() <= 32 < table.heights.max() + 8  # longer side capped

    # The decoder hands back the stored pixels: raw records exactly, JPEG records within a few levels.
    jpeg = Reader(str(output)).metadata["f0"]["mode"] == 0
    assert 0 < jpeg.sum() < 18
    paths = list_samples(tiny_folder, data_limit=-1).paths
    loader = Loader(str(output), batch_size=5, num_workers=1, order=OrderOption.RANDOM, drop_last=False, seed=0,
                    pipelines={"image": [PaddedRGBDecoder(), ToTensor()], "label": None,
                               "index": [IntDecoder(), ToTensor()]})
    seen = 0
    for images, indices in loader:
        for image, index in zip(images.numpy(), indices.view(-1).tolist()):
            height, width = table.heights[index], table.widths[index]
            error = np.abs(image[:height, :width].astype(int) - read_rgb(paths[index], max_resolution=32)).mean()
            assert error < 12 if jpeg[index] else error == 0
            # The row below the image repeats its last row (bilinear crops may read it).
            assert height == image.shape[0] or np.array_equal(image[height, :width], image[height - 1, :width])
            seen += 1
    assert seen == 18


def test_bad_input_is_skipped_counted_and_listed_once(bad_folder, tmp_path, caplog):
    output = tmp_path / "bad.beton"
    with caplog.at_level(logging.WARNING):
        main([str(bad_folder), str(output), "--write-mode", "raw", "--num-workers", "1", "--no-progress"])
    table = read_beton_table(output)
    names = sorted(BAD_FOLDER_READABLE + BAD_FOLDER_SKIPPED)  # the listing: every image-named file, sorted
    kept = [names[i] for i in table.indices]
    assert sorted(kept) == sorted(BAD_FOLDER_READABLE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"skipped {len(BAD_FOLDER_SKIPPED)} of {len(names)}" in warnings[0]
    assert all(name in warnings[0] for name in BAD_FOLDER_SKIPPED)
    big = kept.index("big.jpg")
    assert max(table.heights[big], table.widths[big]) == 512  # the default --max-resolution


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_unusable_folder_is_a_one_line_error(kind, tmp_path, capsys):
    folder = tmp_path / "data"
    if kind == "empty":
        (folder / "class0").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), str(tmp_path / "x.beton"), "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fastssl-convert: error:") and "\n" not in error and str(folder) in error
    assert not (tmp_path / "x.beton").exists()

