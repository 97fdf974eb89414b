"""Batched device augmentations: crop statistics, rates, shapes, determinism, and the colour
ops against torchvision.transforms.functional's single-image ops."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from loaders import augment
from loaders.augment import DeviceMultiCrop, sample_crop_boxes
from loaders.recipe import recipe_from_transforms


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_boxes_follow_scale_and_ratio():
    sizes = torch.tensor([[64, 64], [48, 80], [100, 37]]).repeat(1000, 1)
    boxes = sample_crop_boxes(sizes, scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3), generator=_generator())
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.equal(boxes, boxes.round())
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    fraction = width * height / (sizes[:, 0] * sizes[:, 1])
    # Rounding the sides to whole pixels moves the area by up to about one pixel row and column.
    slack = (width + height + 1) / (sizes[:, 0] * sizes[:, 1])
    assert (fraction >= 0.05 - slack).all() and (fraction <= 0.14 + slack).all()
    assert fraction.mean().item() == pytest.approx(0.095, abs=0.005)  # uniform in the scale range
    log_ratio = torch.log(width / height)
    assert log_ratio.abs().max().item() <= math.log(4 / 3) + 0.2  # rounding of small crops
    assert log_ratio.mean().item() == pytest.approx(0.0, abs=0.02)  # log-uniform, symmetric


def test_crop_boxes_fall_back_to_a_central_crop():
    sizes = torch.tensor([[10, 1000], [1000, 10]])
    boxes = sample_crop_boxes(sizes, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), generator=_generator())
    # Too wide: full height, width at the largest ratio, centred; too tall: the mirror image.
    assert boxes.tolist() == [[493.0, 0.0, 506.0, 10.0], [0.0, 493.0, 10.0, 506.0]]


def _only(transforms_after_crop, size=8):
    return recipe_from_transforms([
        dict(name="RandomResizedCrop", size=size, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
        *transforms_after_crop,
    ])


def test_identity_crop_and_flip_rate():
    recipe = _only([dict(name="RandomHorizontalFlip", p=0.3)])
    images = torch.arange(8 * 8 * 3, dtype=torch.uint8).view(1, 3, 8, 8).repeat(2000, 1, 1, 1)
    sizes = torch.tensor([[8, 8]]).repeat(2000, 1)
    (crops,) = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(images, sizes, generator=_generator())
    expected = images.float() / 255
    same = (crops - expected).abs().amax(dim=(1, 2, 3)) < 1e-6
    flipped = (crops - expected.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert (same ^ flipped).all()  # every output is the image or its mirror, exactly
    rate = flipped.float().mean().item()
    assert rate == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / 2000))


def test_grayscale_rate_without_jitter():
    recipe = _only([dict(name="ImgPilColorDistortion", strength=0.0)], size=4)
    images = torch.randint(0, 256, (2000, 3, 4, 4), dtype=torch.uint8)
    sizes = torch.tensor([[4, 4]]).repeat(2000, 1)
    (crops,) = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(images, sizes, generator=_generator(1))
    grey = (crops - crops.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert grey.float().mean().item() == pytest.approx(0.2, abs=4 * math.sqrt(0.2 * 0.8 / 2000))
    # Strength 0 jitter is the identity (up to the HSV round trip) on the colour images.
    assert torch.allclose(crops[~grey], images[~grey].float() / 255, atol=1e-5)


def test_output_contract_and_determinism(small_recipe):
    images = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8)
    sizes = torch.tensor([[40, 48], [32, 32], [20, 48], [40, 10], [1, 1]])
    multicrop = DeviceMultiCrop(small_recipe, dtype=torch.bfloat16, device="cpu")
    crops = multicrop(images, sizes, generator=_generator(7))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 24, 24)] * 2 + [(5, 3, 12, 12)] * 2
    assert all(c.dtype == torch.bfloat16 and c.is_contiguous(memory_format=torch.channels_last) for c in crops)
    again = multicrop(images, sizes, generator=_generator(7))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    other = multicrop(images, sizes, generator=_generator(8))
    assert not torch.equal(crops[0], other[0])
    # Normalised values of [0, 1] images stay within the normalisation's range.
    low = (0 - max(small_recipe.mean)) / min(small_recipe.std)
    high = (1 - min(small_recipe.mean)) / min(small_recipe.std)
    assert all(c.float().min() >= low - 0.05 and c.float().max() <= high + 0.05 for c in crops)


def test_per_crop_solarize_probability():
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=4, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
        dict(name="ImgPilRandomSolarize", p=[0.0, 1.0]),
    ])
    images = torch.full((50, 3, 4, 4), 200, dtype=torch.uint8)
    first, second = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(
        images, torch.tensor([[4, 4]]).repeat(50, 1), generator=_generator()
    )
    assert torch.allclose(first, torch.full_like(first, 200 / 255))
    assert torch.allclose(second, torch.full_like(second, 55 / 255))


@pytest.fixture
def colour_batch():
    x = torch.rand(6, 3, 9, 11, generator=_generator(3))
    x[0] = 0.5  # grey: zero chroma
    x[1, :, :2] = 0.0  # black pixels
    x[2, 1] = x[2, 0]  # ties between channels
    return x


@pytest.mark.parametrize(
    ("ours", "reference", "factors"),
    [
        (augment.adjust_brightness, TF.adjust_brightness, [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
        (augment.adjust_contrast, TF.adjust_contrast, [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
        (augment.adjust_saturation, TF.adjust_saturation, [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
        (augment.adjust_hue, TF.adjust_hue, [-0.5, -0.2, -0.01, 0.0, 0.13, 0.5]),
    ],
)
def test_colour_ops_match_torchvision(colour_batch, ours, reference, factors):
    result = ours(colour_batch, torch.tensor(factors))
    expected = torch.stack([reference(image, f) for image, f in zip(colour_batch, factors)])
    # torchvision's tensor grey uses 0.2989 for red where ITU-R 601-2 and PIL (the reference
    # loader) use 0.299: a difference below 1e-4.
    torch.testing.assert_close(result, expected, atol=2e-4, rtol=0)


def test_grayscale_solarize_and_blur_match_references(colour_batch):
    r, g, b = colour_batch.double().unbind(dim=1)
    luma = (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # ITU-R 601-2, float64
    torch.testing.assert_close(augment.rgb_to_grayscale(colour_batch).double(), luma, atol=1e-6, rtol=0)
    expected_grey = torch.stack([TF.rgb_to_grayscale(image) for image in colour_batch])
    torch.testing.assert_close(augment.rgb_to_grayscale(colour_batch), expected_grey, atol=2e-4, rtol=0)
    expected_solarized = torch.stack([TF.solarize(image, 128 / 255) for image in colour_batch])
    assert torch.equal(augment.solarize(colour_batch), expected_solarized)
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 3.0]
    expected_blur = torch.stack([TF.gaussian_blur(image, [5, 5], [s, s]) for image, s in zip(colour_batch, sigmas)])
    result = augment.gaussian_blur(colour_batch, sigma=torch.tensor(sigmas), kernel_size=5)
    torch.testing.assert_close(result, expected_blur, atol=1e-5, rtol=0)


def test_colour_distortion_keeps_range_and_changes_images(colour_batch):
    out = augment.color_distortion(colour_batch, strength=1.0, color_p=1.0, gray_p=0.0, generator=_generator())
    assert out.min() >= 0 and out.max() <= 1
    assert ((out - colour_batch).abs().amax(dim=(1, 2, 3)) > 1e-3).all()
