"""The loader contract on a tiny generated dataset, with bad inputs and across simulated ranks."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import images
from loaders.build import build_eval_loader, build_train_loader
from loaders.images import list_images


# The parameters of conftest's tiny_root: 10 classes, 4 train and 2 val images each, 32x32.
TINY = dict(image_size=32, train_per_class=4, val_per_class=2)


def _train_loader(tiny_root, recipe, **overrides):
    arguments = dict(
        source="synthetic", data_path=str(tiny_root), backend="torchvision", recipe=recipe, batch_size=8,
        num_workers=0, drop_last=False, data_limit=-1, seed=0, rank=0, world_size=1, device="cpu",
        dtype=torch.float32, synthetic_params=TINY,
    )
    return build_train_loader(**{**arguments, **overrides})


def _epoch_indices(loader, epoch=0):
    loader.set_epoch(epoch)
    return torch.cat([batch.indices for batch in loader]).tolist()


def test_batch_contract(tiny_root, small_recipe):
    loader = _train_loader(tiny_root, small_recipe, dtype=torch.bfloat16)
    assert loader.num_samples == 40 and len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    batch = batches[0]
    assert [tuple(c.shape) for c in batch.crops] == [(8, 3, 24, 24)] * 2 + [(8, 3, 12, 12)] * 2
    assert all(c.dtype == torch.bfloat16 and c.is_contiguous(memory_format=torch.channels_last) for c in batch.crops)
    assert batch.indices.dtype == torch.int64 and batch.labels.dtype == torch.int64
    _, labels, _ = list_images(tiny_root / "train", data_limit=-1)
    assert batch.labels.tolist() == [labels[i] for i in batch.indices.tolist()]
    indices = torch.cat([b.indices for b in batches]).tolist()
    assert sorted(indices) == list(range(40))  # every sample once, no duplicates
    assert _epoch_indices(loader, 1) != indices  # a new permutation each epoch


def test_two_ranks_partition_the_epoch(tiny_root, small_recipe):
    ranks = [_train_loader(tiny_root, small_recipe, rank=r, world_size=2, batch_size=4) for r in range(2)]
    shards = [_epoch_indices(loader, 3) for loader in ranks]
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(40))


def test_drop_last_and_data_limit(tiny_root, small_recipe):
    loader = _train_loader(tiny_root, small_recipe, batch_size=6, drop_last=True, world_size=2, rank=1)
    sizes = [batch.batch_size for batch in loader]
    assert len(loader) == 3 and sizes == [6, 6, 6]  # 40 // 12 full global batches; the tail of 4 is dropped
    kept = _train_loader(tiny_root, small_recipe, batch_size=6, drop_last=False)
    assert [batch.batch_size for batch in kept] == [6] * 6 + [4]
    limited = _train_loader(tiny_root, small_recipe, data_limit=10)
    assert limited.num_samples == 10 and sorted(_epoch_indices(limited)) == list(range(10))


def test_resume_mid_epoch_and_worker_independence(tiny_root, small_recipe):
    """Same seed and epoch -> the same crops, from any start batch, with or without workers."""
    loader = _train_loader(tiny_root, small_recipe, num_workers=0)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(4, start_batch=3)
    resumed = list(loader)
    assert len(resumed) == len(full) - 3
    with_workers = _train_loader(tiny_root, small_recipe, num_workers=2)
    with_workers.set_epoch(4, start_batch=3)
    for reference in (resumed, list(with_workers)):
        for expected, batch in zip(full[3:], reference):
            assert torch.equal(expected.indices, batch.indices)
            assert all(torch.equal(a, b) for a, b in zip(expected.crops, batch.crops))


def test_eval_loader_is_sequential_and_complete(tiny_root):
    loader = build_eval_loader(
        source="synthetic", data_path=str(tiny_root), split="val", image_size=16, batch_size=8, num_workers=0,
        data_limit=-1, device="cpu", dtype=torch.float32, synthetic_params=TINY, mean=(0.5,) * 3, std=(0.2,) * 3,
    )
    batches = list(loader)
    assert [b.batch_size for b in batches] == [8, 8, 4]
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(20))
    assert all(len(b.crops) == 1 and b.crops[0].shape[1:] == (3, 16, 16) for b in batches)
    assert torch.cat([b.labels for b in batches]).tolist() == sorted(torch.cat([b.labels for b in batches]).tolist())


def test_eval_loader_shards_by_rank_in_dataset_order(tiny_root):
    def eval_loader(rank, world_size):
        return build_eval_loader(
            source="synthetic", data_path=str(tiny_root), split="val", image_size=16, batch_size=3, num_workers=0,
            data_limit=-1, device="cpu", dtype=torch.float32, synthetic_params=TINY, mean=(0.5,) * 3,
            std=(0.2,) * 3, rank=rank, world_size=world_size,
        )

    whole = list(eval_loader(0, 1))
    ranks = [eval_loader(rank, 3) for rank in range(3)]
    assert all(loader.num_samples == 20 for loader in ranks)
    shards = [list(loader) for loader in ranks]
    assert [sum(b.batch_size for b in shard) for shard in shards] == [6, 7, 7]
    assert [len(loader) for loader in ranks] == [2, 3, 3]
    # Gathered in rank order: the single-process pass, indices and crops alike.
    gathered_indices = torch.cat([b.indices for shard in shards for b in shard])
    assert gathered_indices.tolist() == list(range(20))
    gathered_crops = torch.cat([b.crops[0] for shard in shards for b in shard])
    assert torch.equal(gathered_crops, torch.cat([b.crops[0] for b in whole]))


def _bad_folder(root):
    """8 readable files in every awkward format plus 5 that cannot be decoded, flat (no labels)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(colour).save(root / "00_rgb.jpg")
    Image.fromarray(colour[..., 0]).save(root / "01_grey.png")
    Image.fromarray(colour).convert("CMYK").save(root / "02_cmyk.jpg")
    Image.fromarray((colour[..., 0].astype(np.uint16) * 257)).save(root / "03_sixteen.png")
    Image.fromarray(colour).convert("P").save(root / "04_palette.png", transparency=3)
    Image.fromarray(np.dstack([colour, colour[..., :1]])).save(root / "05_rgba.png")
    Image.fromarray(rng.integers(0, 256, (900, 1400, 3), dtype=np.uint8)).save(root / "06_huge.jpg")
    Image.fromarray(colour[:3, :2]).save(root / "07_tiny.png")
    good = (root / "00_rgb.jpg").read_bytes()
    (root / "08_truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "09_empty.jpg").write_bytes(b"")
    (root / "10_text.jpg").write_text("this is not an image")
    (root / "11_garbage.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "12_header_only.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "notes.txt").write_text("ignored: not an image extension")


def test_bad_inputs_are_converted_or_skipped(tmp_path, small_recipe, caplog, monkeypatch):
    _bad_folder(tmp_path / "bad")
    # A scaled-down limit: 06_huge.jpg is above the decode limit (decoded reduced) and below DATA.MAX_IMAGE_PIXELS.
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 90_000)
    loader = _train_loader(tmp_path / "bad", small_recipe, source="disk_folder", batch_size=13)
    assert loader.num_samples == 13
    with caplog.at_level(logging.WARNING, logger="loaders.folder"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == 1 and batches[0].labels is None
            assert all(torch.isfinite(c).all() for c in batches[0].crops)
            assert set(batches[0].indices.tolist()) <= set(range(8))  # replaced by readable files only
    assert sorted(path.rsplit("/", 1)[1] for path in loader.skipped) == [
        "08_truncated.jpg", "09_empty.jpg", "10_text.jpg", "11_garbage.png", "12_header_only.png",
    ]
    assert all(count == 2 for count in loader.skipped.values())  # once per epoch each
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 5  # each path logged once


def test_missing_empty_folder_and_unknown_backend(tmp_path, small_recipe):
    with pytest.raises(FileNotFoundError, match="missing"):
        _train_loader(tmp_path / "missing", small_recipe, source="disk_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        _train_loader(tmp_path / "empty", small_recipe, source="disk_folder")
    with pytest.raises(ValueError, match="unknown loader backend 'nvjpeg'"):
        _train_loader(tmp_path, small_recipe, backend="nvjpeg")
    with pytest.raises(ValueError, match="needs DATA.TRAIN.LOADER=ffcv"):
        _train_loader(tmp_path, small_recipe, source="ffcv")
    with pytest.raises(ValueError, match="unknown data source"):
        _train_loader(tmp_path, small_recipe, source="imagenet")


def test_eval_loader_max_samples_takes_a_fixed_evenly_spaced_subset_over_ranks(tiny_root):
    def eval_loader(rank, world_size):
        return build_eval_loader(
            source="synthetic", data_path=str(tiny_root), split="train", image_size=16, batch_size=3, num_workers=0,
            data_limit=-1, device="cpu", dtype=torch.float32, synthetic_params=TINY, mean=(0.5,) * 3,
            std=(0.2,) * 3, rank=rank, world_size=world_size, max_samples=10)

    whole = torch.cat([b.indices for b in eval_loader(0, 1)]).tolist()
    assert whole == list(range(0, 40, 4))  # 10 of the 40, one in four: every class of the class-sorted folder
    assert sorted(set(torch.cat([b.labels for b in eval_loader(0, 1)]).tolist())) == list(range(10))
    gathered = [index for rank in range(3) for b in eval_loader(rank, 3) for index in b.indices.tolist()]
    assert gathered == whole
