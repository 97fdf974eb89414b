"""Every backend's augmentations against the torchvision reference (loaders/folder.py), on real
photographs: with fixed parameters, each backend's output matches torchvision's within a stated
per-pixel tolerance; with random parameters, the outputs' statistics and the drawn crop boxes are
indistinguishable from torchvision's over more than 1,000 crops (two-sample Kolmogorov-Smirnov
tests at level 0.001, or a chi-square test for the hue histogram).

Backends: 'dali' is the real DALI loader (CPU operators) over PNG files; 'batched' is
loaders.augment.DeviceMultiCrop, the augmentations of the FFCV backend, on the same decoded
pixels (FFCV's .beton stores half the images as JPEG, which would add its own error here).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from loaders.augment import DeviceMultiCrop
from loaders.folder import MultiCropFolder
from loaders.recipe import IDENTITY, recipe_from_transforms

stats = pytest.importorskip("scipy.stats")

HEIGHT, WIDTH = 40, 48  # small, as the CPU recipes' images are; aspect 1.2
NUM_IMAGES = 48
LEVEL = 0.001  # each two-sample test's level


def _photo_pixels(seed: int = 0) -> np.ndarray:
    """(NUM_IMAGES, HEIGHT, WIDTH, 3) uint8: random views of scikit-image's photographs, shrunk."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    out = []
    for i in range(NUM_IMAGES):
        photo = photos[i % len(photos)]
        h = int(rng.integers(photo.shape[0] // 3, photo.shape[0]))
        w = min(photo.shape[1], round(h * WIDTH / HEIGHT))
        top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        view = Image.fromarray(photo[top:top + h, left:left + w]).resize((WIDTH, HEIGHT), Image.LANCZOS)
        out.append(np.asarray(view))
    return np.stack(out)


def _write_folder(root, pixels: np.ndarray):
    from PIL import Image

    (root / "c").mkdir(parents=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(root / "c" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    pixels = _photo_pixels()
    return _write_folder(tmp_path_factory.mktemp("photos"), pixels), pixels


@pytest.fixture(scope="module")
def coordinates(tmp_path_factory):
    """Images whose red channel is the column and green the row (scaled to 0..255): a crop's
    pixels give back its box."""
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([columns * 255 / (WIDTH - 1), rows * 255 / (HEIGHT - 1), np.zeros_like(rows)], -1)
    pixels = np.repeat(np.round(image).astype(np.uint8)[None], NUM_IMAGES, axis=0)
    return _write_folder(tmp_path_factory.mktemp("coordinates"), pixels), pixels


def _crops(backend: str, folder, pixels: np.ndarray, recipe, *, epochs: int = 1) -> list[np.ndarray]:
    """Per crop of the recipe, (epochs * NUM_IMAGES, s, s, 3) float64 pixels in [0, 1] (the recipe
    normalises with mean 0, std 1), images in dataset order within each epoch."""
    recipe = replace(recipe, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = [[] for _ in range(recipe.total_num_crops)]
    if backend == "torchvision":
        dataset = MultiCropFolder(folder, recipe=recipe, seed=0, data_limit=-1)
        for epoch in range(epochs):
            for index in range(len(dataset)):
                for crop, tensor in enumerate(dataset[index, epoch][0]):
                    out[crop].append(tensor[None])
    elif backend == "batched":
        multicrop = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        sizes = torch.tensor([[HEIGHT, WIDTH]]).repeat(len(pixels), 1)
        for epoch in range(epochs):
            crops = multicrop(images, sizes, generator=torch.Generator().manual_seed(epoch))
            for crop, tensor in enumerate(crops):
                out[crop].append(tensor.clone())
    else:
        pytest.importorskip("nvidia.dali", reason="dali is not installed (pip install fastssl[dali])")
        from loaders.dali import build_dali_loader

        loader = build_dali_loader(source="disk_folder", data_path=str(folder), backend="dali", recipe=recipe,
                                   batch_size=16, num_workers=1, drop_last=False, data_limit=-1, seed=0, rank=0,
                                   world_size=1, device="cpu", dtype=torch.float32, channels_last=False)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            batches = list(loader)
            order = torch.cat([b.indices for b in batches]).argsort()
            for crop in range(recipe.total_num_crops):
                out[crop].append(torch.cat([b.crops[crop] for b in batches])[order])
    return [torch.cat(tensors).permute(0, 2, 3, 1).double().numpy() for tensors in out]


# ---------------------------------------------------------------------------------------------
# Fixed parameters: the whole image as the crop box (area 1 at the image's own aspect ratio),
# then one transform with fixed values; tolerances in 1/255 (max over pixels, mean over pixels).
# ---------------------------------------------------------------------------------------------

_WHOLE = dict(crop_scales=((1.0, 1.0),), crop_ratio=(WIDTH / HEIGHT, WIDTH / HEIGHT))


def _jitter(**factors):
    values = dict(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=(0.0, 0.0))
    values.update({key: (value, value) for key, value in factors.items()})
    return dict(jitter_p=1.0, **values)


# name: (augmentation changes, crop size, {backend: (max, mean) tolerance in 1/255}). The
# tolerances are the measured differences rounded up. What they hold: DALI's antialiased resize
# is not PIL's (up to 8/255 at 32 px and 15/255 at 16 px from 48 x 40, 0.2 and 0.4 on average;
# every DALI case carries it); torchvision's ColorJitter runs all four ops, each on uint8 PIL
# images (its hue op round-trips through 8-bit HSV even at a zero shift), where the affine colour
# map of both other backends rounds once; and the hue shift is a rotation about the grey axis,
# not HSV's hexcone (loaders/colour.py), 6-13/255 off on average.
FIXED = {
    "box_32": ({}, 32, {"dali": (9, 0.3), "batched": (1, 0.05)}),
    "box_16": ({}, 16, {"dali": (16, 0.5), "batched": (1, 0.05)}),
    "flip": ({"flip_p": 1.0}, 32, {"dali": (9, 0.3), "batched": (1, 0.05)}),
    "brightness_1.4": (_jitter(brightness=1.4), 32, {"dali": (12, 1.0), "batched": (8, 0.8)}),
    "brightness_0.6": (_jitter(brightness=0.6), 32, {"dali": (6, 0.7), "batched": (4, 0.7)}),
    "contrast_1.4": (_jitter(contrast=1.4), 32, {"dali": (13, 0.9), "batched": (8, 0.8)}),
    "contrast_0.6": (_jitter(contrast=0.6), 32, {"dali": (6, 0.7), "batched": (4, 0.7)}),
    "saturation_1.6": (_jitter(saturation=1.6), 32, {"dali": (10, 1.0), "batched": (9, 0.9)}),
    "saturation_0.4": (_jitter(saturation=0.4), 32, {"dali": (9, 0.8), "batched": (5, 0.8)}),
    "hue_+0.1": (_jitter(hue=0.1), 32, {"dali": (45, 14), "batched": (45, 14)}),
    "hue_-0.1": (_jitter(hue=-0.1), 32, {"dali": (41, 6.5), "batched": (41, 6.5)}),
    "grayscale": ({"gray_p": 1.0}, 32, {"dali": (9, 0.3), "batched": (2, 0.3)}),
    # PIL's blur: DALI runs its box passes (uint8 per pass), the batched path one matrix (loaders/blur.py).
    "blur_1.0": ({"blur_p": 1.0, "blur_sigma": (1.0, 1.0)}, 32, {"dali": (6, 0.3), "batched": (3, 0.6)}),
    "solarize": ({"solarize_p": 1.0}, 32, {"dali": (9, 0.3), "batched": (1, 0.05)}),
}


@pytest.fixture(scope="module")
def fixed_outputs(photos):
    """{name: {backend: (NUM_IMAGES, s, s, 3)}} for every FIXED case and backend, built in one
    pipeline per backend and crop size (a crop per case)."""
    folder, pixels = photos
    out = {name: {} for name in FIXED}
    for size in sorted({size for _, size, _ in FIXED.values()}):
        names = [name for name, (_, s, _) in FIXED.items() if s == size]
        recipe = recipe_from_transforms([dict(name="RandomResizedCrop", size=size)])
        recipe = replace(recipe, num_crops=(len(names),), **_WHOLE,
                         augmentations=tuple(replace(IDENTITY, **FIXED[name][0]) for name in names))
        for backend in ("torchvision", "dali", "batched"):
            for name, crops in zip(names, _crops(backend, folder, pixels, recipe)):
                out[name][backend] = crops
    return out


@pytest.mark.parametrize("backend", ["dali", "batched"])
@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_parameters_match_torchvision(fixed_outputs, name, backend):
    outputs = fixed_outputs[name]
    difference = np.abs(outputs[backend] - outputs["torchvision"]) * 255
    max_tolerance, mean_tolerance = FIXED[name][2][backend]
    assert difference.max() <= max_tolerance + 0.01 and difference.mean() <= mean_tolerance, (  # float32 slack
        f"{name} {backend}: max {difference.max():.1f}, mean {difference.mean():.2f} (in 1/255)")


# ---------------------------------------------------------------------------------------------
# Random parameters: the demo's augmentations (SimCLR's colour distortion at strength 1, so the
# colour statistics move a lot) and solarize, over NUM_IMAGES x 6 epochs x 6 crops = 1,728 crops a backend.
# ---------------------------------------------------------------------------------------------

def _random_recipe():
    return recipe_from_transforms([
        dict(name="ImgPilToMultiCrop", total_num_crops=6, size_crops=[32, 16], num_crops=[2, 4],
             crop_scales=[[0.25, 1], [0.08, 0.25]]),
        dict(name="RandomHorizontalFlip", p=0.5),
        dict(name="ImgPilColorDistortion", strength=1.0),
        dict(name="ImgPilRandomSolarize", p=0.2),
    ])


def _hsv(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel (saturation, hue in turns) of crops (..., 3) in [0, 1], HSV's definitions."""
    high, low = crops.max(-1), crops.min(-1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-12), 0.0)
    r, g, b = np.moveaxis(crops, -1, 0)
    safe = np.maximum(chroma, 1e-12)
    hue = np.where(high == r, (g - b) / safe, np.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    return saturation, (hue / 6) % 1.0


def _crop_statistics(groups: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Per crop: mean, standard deviation, mean saturation; and the dominant hue bin (of 12) of
    each crop's coloured pixels (saturation > 0.15), -1 where it has none."""
    out = {}
    for group, crops in groups.items():
        saturation, hue = _hsv(crops)
        coloured = saturation > 0.15
        bins = np.floor(hue * 12).astype(int)
        counts = np.stack([((bins == k) & coloured).sum(axis=(1, 2)) for k in range(12)], 1)
        dominant = np.where(coloured.sum(axis=(1, 2)) > 0, counts.argmax(1), -1)
        out.update({f"mean_{group}": crops.mean(axis=(1, 2, 3)), f"std_{group}": crops.std(axis=(1, 2, 3)),
                    f"saturation_{group}": saturation.mean(axis=(1, 2)), f"hue_{group}": dominant})
    return out


def _groups(crops: list[np.ndarray]) -> dict[int, np.ndarray]:
    return {32: np.concatenate(crops[:2]), 16: np.concatenate(crops[2:])}


@pytest.fixture(scope="module")
def random_statistics(photos):
    folder, pixels = photos
    return {backend: _crop_statistics(_groups(_crops(backend, folder, pixels, _random_recipe(), epochs=6)))
            for backend in ("torchvision", "dali", "batched")}


@pytest.mark.parametrize("backend", ["dali", "batched"])
def test_random_crop_statistics_are_torchvisions(random_statistics, backend):
    reference, other = random_statistics["torchvision"], random_statistics[backend]
    assert len(reference["mean_32"]) + len(reference["mean_16"]) >= 1000
    failures = []
    for name in reference:
        if name.startswith("hue"):  # a histogram of categories: chi-square on the 2 x 13 table
            table = np.stack([np.bincount(sample + 1, minlength=13) for sample in (reference[name], other[name])])
            table = table[:, table.sum(0) > 0]
            p = stats.chi2_contingency(table).pvalue
        else:
            p = stats.ks_2samp(reference[name], other[name]).pvalue
        if p < LEVEL:
            failures.append(f"{name}: p = {p:.2g}")
    assert not failures, f"{backend} differs from torchvision: {', '.join(failures)}"


def _boxes(crops: np.ndarray) -> dict[str, np.ndarray]:
    """Per crop of the coordinate images: area fraction, aspect ratio w / h, centre (x, y) as a
    fraction of the image, and whether it was mirrored, from the pixel slopes at the crop's centre."""
    size = crops.shape[1]
    m = size // 2
    x, y = crops[..., 0] * (WIDTH - 1), crops[..., 1] * (HEIGHT - 1)
    step_x = x[:, m, m] - x[:, m, m - 1]
    width, height = np.abs(step_x) * size, (y[:, m, m] - y[:, m - 1, m]) * size
    return {"scale": width * height / (WIDTH * HEIGHT), "aspect": width / height,
            "centre_x": ((x[:, m, m] + x[:, m, m - 1]) / 2 + 0.5) / WIDTH,
            "centre_y": ((y[:, m, m] + y[:, m - 1, m]) / 2 + 0.5) / HEIGHT, "flip": (step_x < 0).astype(float)}


@pytest.fixture(scope="module")
def random_boxes(coordinates):
    folder, pixels = coordinates
    recipe = recipe_from_transforms([
        dict(name="ImgPilToMultiCrop", total_num_crops=6, size_crops=[32, 16], num_crops=[2, 4],
             crop_scales=[[0.25, 1], [0.08, 0.25]]),
        dict(name="RandomHorizontalFlip", p=0.5),
    ])
    return {backend: {group: _boxes(crops) for group, crops in _groups(
        _crops(backend, folder, pixels, recipe, epochs=4)).items()} for backend in ("torchvision", "dali", "batched")}


@pytest.mark.parametrize("backend", ["dali", "batched"])
def test_random_crop_boxes_and_flips_are_torchvisions(random_boxes, backend):
    failures = []
    for group, reference in random_boxes["torchvision"].items():
        for name, values in reference.items():
            p = stats.ks_2samp(values, random_boxes[backend][group][name]).pvalue
            if p < LEVEL:
                failures.append(f"{name} of the {group} px crops: p = {p:.2g}")
    assert not failures, f"{backend} differs from torchvision: {', '.join(failures)}"
