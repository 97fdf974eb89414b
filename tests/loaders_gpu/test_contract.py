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


def _uniform_folder(root, *, count: int):
    """Images of one random colour each (sizes vary): any crop of one is that colour, so the
    crops of an image differ in colour only by their colour draws."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / "flat").mkdir(parents=True)
    for i in range(count):
        height, width = rng.integers(24, 48, size=2)
        colour = rng.integers(40, 216, size=3).astype(np.uint8)
        Image.fromarray(np.broadcast_to(colour, (height, width, 3)).copy()).save(root / "flat" / f"{i:03d}.png")
    return root


def _beton_of(backend, folder, tmp_path):
    if backend != "ffcv":
        return None
    _require("ffcv")
    from loaders.beton import convert_image_folder

    beton = tmp_path / "flat.beton"
    convert_image_folder(folder, beton, max_resolution=64, write_mode="raw", jpeg_quality=90,
                         compress_probability=0.0, num_workers=1, progress=False)
    return beton


JITTER = dict(name="ColorJitter", brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4)  # VISSL's NPID values
TWO_BY_TWO = dict(name="ImgPilToMultiCrop", total_num_crops=4, num_crops=[2, 2], size_crops=[16, 8],
                  crop_scales=[[0.3, 1.0], [0.1, 0.3]])


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_colour_before_the_crop_is_one_draw_per_image(backend, tmp_path):
    """VISSL's order: ColorJitter listed before the crop jitters the whole image, so all the
    crops of an image share one jitter; listed after, each crop draws its own."""
    from loaders.recipe import recipe_from_transforms

    _require(backend)
    folder = _uniform_folder(tmp_path / "images", count=16)
    beton = _beton_of(backend, folder, tmp_path)
    spreads = {}
    for place, transforms in (("before", [JITTER, TWO_BY_TWO]), ("after", [TWO_BY_TWO, JITTER])):
        recipe = recipe_from_transforms(transforms)
        assert recipe.colour_per_image is (place == "before")
        batches = _epoch(build(backend, folder=folder, beton=beton, recipe=recipe, batch_size=8,
                               dtype=torch.float32), 0)
        colours = torch.stack([torch.cat([b.crops[c].mean(dim=(2, 3)) for b in batches]) for c in range(4)])
        spreads[place] = (colours.amax(dim=0) - colours.amin(dim=0)).amax(dim=1)  # (images,) in [0, 1] units
    # One draw: every crop of an image is the same colour (rounding and resampling only).
    assert spreads["before"].max() < 3 / 255, backend
    # Per crop: crops of an image differ by their own jitter (|factor - 1| up to 0.4, hue 0.4 turn).
    assert spreads["after"].median() > 20 / 255, backend


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_resize_and_center_crop_is_the_deterministic_centre(backend, tmp_path):
    """Resize 256 then CenterCrop 224, scaled down: the same crop every epoch, the image's centre."""
    from loaders.recipe import recipe_from_transforms

    _require(backend)
    folder = _gradient_folder(tmp_path / "images", count=4)  # 256 x 256: red is x, green is y
    beton = _beton_of(backend, folder, tmp_path)
    recipe = recipe_from_transforms([dict(name="Resize", size=64), dict(name="CenterCrop", size=32),
                                     dict(name="ToTensor")])
    loader = build(backend, folder=folder, beton=beton, recipe=recipe, batch_size=4, dtype=torch.float32)
    first, second = (torch.cat([b.crops[0] for b in _epoch(loader, e)]) for e in (0, 1))
    torch.testing.assert_close(first, second)
    # Resize 256 -> 64 (x4), centre 32 of 64: the original's pixels 64..191 in x and y.
    pixels = first * 255
    assert abs(pixels[:, 0, :, 0].mean().item() - 65.5) < 3 and abs(pixels[:, 0, :, -1].mean().item() - 189.5) < 3
    assert abs(pixels[:, 1, 0, :].mean().item() - 65.5) < 3 and abs(pixels[:, 1, -1, :].mean().item() - 189.5) < 3
