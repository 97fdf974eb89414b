"""Every installed backend against the batch contract, on the same tiny dataset.

torchvision (the reference) always runs; DALI and FFCV run where installed (CI installs both)
and skip with the reason otherwise.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from loaders.build import build_train_loader

NUM_SAMPLES, PER_CLASS = 18, 6  # the tiny_folder fixture: 3 classes x 6 images


def _require(backend: str) -> None:
    module = {"dali": "nvidia.dali", "ffcv": "ffcv"}.get(backend)
    try:
        found = module is None or importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # find_spec imports the parent package (nvidia)
        found = False
    if not found:
        pytest.skip(f"{backend} is not installed (pip install fastssl[{backend}])")


@pytest.fixture(scope="session")
def tiny_beton(tiny_folder, tmp_path_factory):
    pytest.importorskip("ffcv", reason="ffcv is not installed (pip install fastssl[ffcv])")
    from loaders.beton import convert_image_folder

    beton = tmp_path_factory.mktemp("beton") / "tiny.beton"
    convert_image_folder(tiny_folder, beton, max_resolution=64, write_mode="proportion", jpeg_quality=90,
                         compress_probability=0.5, num_workers=1, progress=False)
    return beton


def build(backend: str, *, folder, beton, recipe, **overrides):
    _require(backend)
    args = dict(source="disk_folder", data_path=str(folder), backend=backend, recipe=recipe, batch_size=4,
                num_workers=1, drop_last=False, data_limit=-1, seed=3, rank=0, world_size=1, device="cpu",
                dtype=torch.bfloat16, synthetic_params=None)
    args.update(overrides)
    if backend == "dali":
        from loaders.dali import build_dali_loader

        return build_dali_loader(**args)
    if backend == "ffcv":
        from loaders.ffcv import build_ffcv_loader

        return build_ffcv_loader(**dict(args, source="ffcv", data_path=str(beton)))
    return build_train_loader(**args)


def _epoch(loader, epoch: int, start_batch: int = 0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


@pytest.fixture(scope="module")
def reference_order(tiny_folder, tiny_recipe):
    loader = build("torchvision", folder=tiny_folder, beton=None, recipe=tiny_recipe)
    return [batch.indices.tolist() for batch in _epoch(loader, 1)]


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_batches_follow_the_contract(backend, tiny_folder, tiny_recipe, request, reference_order):
    beton = request.getfixturevalue("tiny_beton") if backend == "ffcv" else None
    loader = build(backend, folder=tiny_folder, beton=beton, recipe=tiny_recipe)
    assert loader.num_samples == NUM_SAMPLES and len(loader) == 5  # ceil(18 / 4): the last batch is short
    batches = _epoch(loader, 1)
    assert len(batches) == 5 and [b.batch_size for b in batches] == [4, 4, 4, 4, 2]
    for batch in batches:
        assert [tuple(c.shape[1:]) for c in batch.crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
        for crop in batch.crops:
            assert crop.dtype == torch.bfloat16 and crop.device.type == "cpu"
            assert crop.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(crop.float()).all() and crop.float().std() > 0.1  # normalised pixels
        assert batch.indices.dtype == torch.int64
        assert torch.equal(batch.labels, batch.indices // PER_CLASS)  # class folders in sorted order
    indices = [i for b in batches for i in b.indices.tolist()]
    assert sorted(indices) == list(range(NUM_SAMPLES))  # an epoch visits every sample once
    # One sampler for all backends: the same seed gives the same order as the reference.
    assert [b.indices.tolist() for b in batches] == reference_order


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_ranks_share_an_epoch_without_overlap(backend, tiny_folder, tiny_recipe, request):
    beton = request.getfixturevalue("tiny_beton") if backend == "ffcv" else None
    seen = []
    for rank in range(2):
        loader = build(backend, folder=tiny_folder, beton=beton, recipe=tiny_recipe, rank=rank, world_size=2,
                       drop_last=True)
        batches = _epoch(loader, 0)
        assert len(loader) == len(batches) == 2  # 18 // (2 ranks * 4): the tail is dropped on every rank
        assert all(b.batch_size == 4 for b in batches)
        seen.append({i for b in batches for i in b.indices.tolist()})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_resume_mid_epoch_replays_the_rest(backend, tiny_folder, tiny_recipe, request):
    beton = request.getfixturevalue("tiny_beton") if backend == "ffcv" else None
    loader = build(backend, folder=tiny_folder, beton=beton, recipe=tiny_recipe, data_limit=12, dtype=torch.float32)
    assert loader.num_samples == 12
    full, resumed = _epoch(loader, 2), _epoch(loader, 2, start_batch=1)
    assert [b.indices.tolist() for b in resumed] == [b.indices.tolist() for b in full[1:]]
    assert sorted(i for b in full for i in b.indices.tolist()) == list(range(12))
    if backend == "ffcv":  # crops are drawn per (seed, rank, epoch, batch): a resumed batch is the same batch
        assert all(torch.equal(x, y) for a, b in zip(full[1:], resumed) for x, y in zip(a.crops, b.crops))
    following = _epoch(loader, 3)
    assert [b.indices.tolist() for b in following] != [b.indices.tolist() for b in full]  # a new permutation
    assert not torch.equal(following[0].crops[0], full[0].crops[0])


def _gradient_folder(root, *, count: int):
    """Images whose red channel is x and green channel is y (0..255): a crop reveals its box."""
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256].astype(np.uint8)
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1)
    (root / "grad").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(pixels).save(root / "grad" / f"{i:03d}.png")
    return root


def _crop_statistics(loader, *, recipe, epochs: int):
    """(area fractions, flipped flags, grayscale flags) of the first crop of every sample."""
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    crops = torch.cat([b.crops[0].float() for e in range(epochs) for b in _epoch(loader, e)]) * std + mean
    pixels = crops * 255  # (n, 3, s, s)
    size = pixels.shape[-1]
    red_span = (pixels[:, 0, :, -1] - pixels[:, 0, :, 0]).mean(dim=1)  # x at the right edge - at the left
    green_span = (pixels[:, 1, -1, :] - pixels[:, 1, 0, :]).mean(dim=1)
    area = (red_span.abs() * green_span.abs()) * (size / (size - 1)) ** 2 / 256**2
    grey = (pixels[:, 0] - pixels[:, 1]).abs().amax(dim=(1, 2)) < 3
    return area, red_span < 0, grey


# FFCV's crops are loaders.augment.DeviceMultiCrop, whose statistics are tested at the augment level.
@pytest.mark.parametrize("backend", ["dali"])
def test_augmentation_statistics_match_the_reference(backend, tmp_path, tiny_recipe):
    from loaders.recipe import recipe_from_transforms

    _require(backend)
    folder = _gradient_folder(tmp_path, count=48)
    crop = [dict(name="RandomResizedCrop", size=32, scale=[0.2, 0.6]), dict(name="RandomHorizontalFlip", p=0.5),
            dict(name="Normalize", mean=list(tiny_recipe.mean), std=list(tiny_recipe.std))]
    geometry = recipe_from_transforms(crop)
    colour = recipe_from_transforms([*crop, dict(name="ImgPilColorDistortion", strength=0.5)])
    beton = None
    stats = {}
    for name in ("torchvision", backend):
        area, flipped, _ = _crop_statistics(
            build(name, folder=folder, beton=beton, recipe=geometry, batch_size=16, dtype=torch.float32),
            recipe=geometry, epochs=4)
        _, _, grey = _crop_statistics(
            build(name, folder=folder, beton=beton, recipe=colour, batch_size=16, dtype=torch.float32),
            recipe=colour, epochs=4)
        assert area.min() > 0.2 * 0.85 and area.max() < 0.6 * 1.15, name  # crop areas inside crop_scales
        stats[name] = (area.mean().item(), flipped.float().mean().item(), grey.float().mean().item())
    (ref_area, ref_flip, ref_grey), (area, flip, grey) = stats["torchvision"], stats[backend]
    # 192 crops each: rates agree within ~3 standard errors of a difference.
    assert abs(area - ref_area) < 0.04 and abs(area - 0.4) < 0.04
    assert abs(flip - ref_flip) < 0.17 and abs(flip - 0.5) < 0.12
    assert abs(grey - ref_grey) < 0.14 and abs(grey - 0.2) < 0.1
