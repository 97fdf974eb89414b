"""recipe_from_transforms: VISSL transform lists, checked strictly -> MultiCropRecipe."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest

from loaders.recipe import CropAugmentation, recipe_from_transforms
from loaders.transform_keys import TRANSFORM_KEYS

REPO = Path(__file__).resolve().parents[2]

SWAV = [
    dict(name="ImgPilToMultiCrop", total_num_crops=8, num_crops=[2, 6], size_crops=[224, 96],
         crop_scales=[[0.14, 1], [0.05, 0.14]]),
    dict(name="RandomHorizontalFlip", p=0.5),
    dict(name="ImgPilColorDistortion", strength=1.0),
    dict(name="ImgPilGaussianBlur", p=0.5, radius_min=0.1, radius_max=2.0),
    dict(name="ToTensor"),
    dict(name="Normalize", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
]


def _flat(augmentation: CropAugmentation) -> list[float]:
    return [v for field in astuple(augmentation) for v in (field if isinstance(field, tuple) else (field,))]


def test_swav_multicrop():
    recipe = recipe_from_transforms(SWAV)
    assert recipe.size_crops == (224, 96) and recipe.num_crops == (2, 6)
    assert recipe.total_num_crops == 8
    assert recipe.crop_sizes == [224, 224] + [96] * 6
    assert recipe.crop_scales == ((0.14, 1.0), (0.05, 0.14))
    assert recipe.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    # Strength 1 is ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, then grayscale with p 0.2 (VISSL).
    expected = CropAugmentation(
        flip_p=0.5, jitter_p=0.8, brightness=(0.2, 1.8), contrast=(0.2, 1.8), saturation=(0.2, 1.8), hue=(-0.2, 0.2),
        gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.0)
    assert len(recipe.augmentations) == 8
    assert all(_flat(crop) == pytest.approx(_flat(expected)) for crop in recipe.augmentations)
    assert recipe.mean == (0.485, 0.456, 0.406) and recipe.std == (0.229, 0.224, 0.225)


def test_byol_per_view_probabilities():
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=224),
        dict(name="ImgPilColorDistortion", strength=0.5),
        dict(name="ImgPilGaussianBlur", p=[1.0, 0.1], radius_min=0.1, radius_max=2.0),
        dict(name="ImgPilRandomSolarize", p=[0.0, 0.2]),
    ])
    assert recipe.num_crops == (2,) and recipe.crop_sizes == [224, 224]
    assert recipe.crop_scales == ((0.08, 1.0),)
    views = recipe.augmentations
    assert [v.blur_p for v in views] == [1.0, 0.1] and [v.solarize_p for v in views] == [0.0, 0.2]
    assert all(v.brightness == (0.6, 1.4) and v.hue == (-0.1, 0.1) and v.flip_p == 0.0 for v in views)
    assert recipe.mean == (0.0, 0.0, 0.0) and recipe.std == (1.0, 1.0, 1.0)  # no Normalize: plain [0, 1]


def test_random_apply_wrapper_and_single_crop():
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=[96], scale=[0.2, 1.0]),
        dict(name="ImgPilMultiCropRandomApply", transforms=[dict(name="ImgPilRandomSolarize", p=1.0)], prob=[0.0, 0.2]),
    ])
    assert [v.solarize_p for v in recipe.augmentations] == [0.0, 0.2] and recipe.crop_scales == ((0.2, 1.0),)
    single = recipe_from_transforms([dict(name="RandomResizedCrop", size=64)])
    assert single.total_num_crops == 1 and single.crop_sizes == [64]


def test_per_group_probability_expands_to_crops():
    transforms = [SWAV[0], dict(name="ImgPilGaussianBlur", p=[0.9, 0.3])]
    assert [v.blur_p for v in recipe_from_transforms(transforms).augmentations] == [0.9, 0.9] + [0.3] * 6


@pytest.mark.parametrize(
    ("transforms", "words"),
    [
        ([SWAV[0], dict(name="RandomVerticalFlip")], "RandomVerticalFlip"),
        ([SWAV[0], dict(name="Normalize", mean=[0.5] * 3)], "Normalize needs key 'std'"),
        ([SWAV[0], dict(name="Normalize", mean=[0.5] * 2, std=[0.2] * 3)], "Normalize mean must be a list of 3"),
        ([SWAV[0], dict(name="ToTensor", scale=True)], "ToTensor has no key 'scale'; it takes none"),
        ([SWAV[0], dict(name="ImgPilGaussianBlur", radius_min=2.0, radius_max=1.0)], "radius_min 2.0 and radius_max"),
        ([SWAV[0], dict(name="RandomHorizontalFlip"), dict(name="RandomHorizontalFlip")], "both set flip_p"),
        ([SWAV[0], {"p": 0.5}], "is not a transform"),
        ([dict(SWAV[0], total_num_crops=7)], "total_num_crops"),
        ([dict(SWAV[0], size_crops=[224])], "size_crops"),
        ([SWAV[0], dict(name="ImgPilGaussianBlur", p=[0.5, 0.5, 0.5])], "3 values for 8 crops"),
        ([SWAV[0], dict(name="ImgPilRandomSolarize", p=1.5)], "[0, 1]"),
        ([dict(name="ToTensor")], "no crop transform"),
        ([SWAV[0], dict(name="RandomResizedCrop", size=32)], "second crop transform"),
    ],
)
def test_bad_transforms_are_one_line_errors(transforms, words):
    with pytest.raises(ValueError) as error:
        recipe_from_transforms(transforms)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_misspelt_key_names_the_transform_and_the_closest_key():
    with pytest.raises(ValueError) as error:
        recipe_from_transforms([SWAV[0], dict(name="ImgPilColorDistortion", strenght=0.5)])
    assert str(error.value) == "transforms: ImgPilColorDistortion has no key 'strenght'; did you mean 'strength'?"


def test_an_unknown_transform_lists_the_supported_ones():
    with pytest.raises(ValueError) as error:
        recipe_from_transforms([SWAV[0], dict(name="ImgPilColourDistortion", strength=0.5)])
    message = str(error.value)
    assert message.startswith("transforms: unknown transform 'ImgPilColourDistortion' (did you mean "
                              "'ImgPilColorDistortion'?); supported: ")
    assert all(name in message for name in TRANSFORM_KEYS) and "\n" not in message


@pytest.mark.parametrize(
    "transform",
    [
        dict(name="ImgPilGaussianBlur", p="high"),
        dict(name="ImgPilMultiCropRandomApply", transforms=[dict(name="ImgPilGaussianBlur", p="high")], prob=[1, 1]),
    ],
)
def test_a_wrong_type_is_a_one_line_error_naming_the_key(transform):
    with pytest.raises(ValueError) as error:
        recipe_from_transforms([SWAV[0], transform])
    message = str(error.value)
    assert message.startswith("transforms: ImgPilGaussianBlur p must be a probability in [0, 1]")
    assert message.endswith("got 'high'") and "\n" not in message


@pytest.mark.parametrize(("key", "value"), [("strength", "0.5"), ("strength", True), ("strength", [0.5])])
def test_numbers_are_numbers(key, value):
    with pytest.raises(ValueError, match=f"ImgPilColorDistortion {key} must be a number"):
        recipe_from_transforms([SWAV[0], dict(name="ImgPilColorDistortion", **{key: value})])


def test_asymmetric_views_through_random_apply_resolve_per_crop():
    """BYOL's views as VISSL writes them: blur p 1.0 / 0.1 and solarize p 0.0 / 0.2 per crop."""
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=224),
        dict(name="RandomHorizontalFlip", p=0.5),
        dict(name="ImgPilColorDistortion", strength=0.5),
        dict(name="ImgPilMultiCropRandomApply", prob=[1.0, 0.1],
             transforms=[dict(name="ImgPilGaussianBlur", p=1.0, radius_min=0.1, radius_max=2.0)]),
        dict(name="ImgPilMultiCropRandomApply", prob=[0.0, 0.2], transforms=[dict(name="ImgPilRandomSolarize", p=1.0)]),
    ])
    first, second = recipe.augmentations
    assert (first.blur_p, second.blur_p) == (1.0, 0.1) and (first.solarize_p, second.solarize_p) == (0.0, 0.2)
    assert first.blur_sigma == second.blur_sigma == (0.1, 2.0)
    assert first.flip_p == second.flip_p == 0.5 and first.jitter_p == second.jitter_p == 0.8
    # A wrapped transform's own p (VISSL's default where it is omitted) multiplies the wrapper's prob.
    halved = recipe_from_transforms([SWAV[0], dict(name="ImgPilMultiCropRandomApply", prob=[0.8, 0.4],
                                                   transforms=[dict(name="ImgPilGaussianBlur")])])
    assert [crop.blur_p for crop in halved.augmentations] == [0.4] * 2 + [0.2] * 6


def test_cli_reports_a_misspelt_transform_key_in_one_line_before_training(tmp_path):
    transforms = ("[{name: ImgPilToMultiCrop, total_num_crops: 2, size_crops: [32], num_crops: [2], "
                  "crop_scales: [[0.14, 1]]}, {name: ImgPilColorDistortion, strenght: 0.5}]")
    checkpoints = tmp_path / "checkpoints"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "FASTSSL_CACHE": str(tmp_path / "cache")}
    environment.pop("FASTSSL_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "fastssl.train", "config=pretrain/swav/swav_1node_cpu_resnet18",
         f"config.DATA.TRAIN.TRANSFORMS={transforms}", f"config.CHECKPOINT.DIR={checkpoints}"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["fastssl-train: error: transforms: ImgPilColorDistortion has no key 'strenght'; "
                      "did you mean 'strength'?"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "cache").exists()  # not even the dataset was made
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_torchvision_transforms_take_vissls_keys_and_defaults():
    # torchvision's ColorJitter: always applied, factors in [max(0, 1 - x), 1 + x], hue in [-h, h].
    recipe = recipe_from_transforms([
        dict(name="RandomResizedCrop", size=32, scale=[0.2, 1.0], ratio=[0.5, 2.0], interpolation=3),
        dict(name="ColorJitter", brightness=1.2, saturation=0.3),
        dict(name="RandomGrayscale"),
    ])
    (crop,) = recipe.augmentations
    assert crop.jitter_p == 1.0 and crop.brightness == (0.0, 2.2) and crop.saturation == pytest.approx((0.7, 1.3))
    assert crop.contrast == (1.0, 1.0) and crop.hue == (0.0, 0.0)  # ColorJitter's defaults: 0, untouched
    assert crop.gray_p == 0.1  # RandomGrayscale's default p
    assert recipe.interpolation == "bicubic" and recipe.crop_ratio == (0.5, 2.0)
    assert not recipe.colour_per_image  # listed after the crop: each crop draws its own
    assert recipe_from_transforms([dict(name="RandomResizedCrop", size=32)]).interpolation == "bilinear"


def test_colour_before_the_crop_is_drawn_once_per_image():
    recipe = recipe_from_transforms([dict(name="ColorJitter", hue=0.1), dict(name="RandomGrayscale", p=0.3), SWAV[0]])
    assert recipe.colour_per_image and recipe.total_num_crops == 8
    assert all(crop.hue == (-0.1, 0.1) and crop.gray_p == 0.3 for crop in recipe.augmentations)


def test_resize_then_center_crop_is_the_deterministic_single_crop():
    recipe = recipe_from_transforms([dict(name="Resize", size=256, interpolation=3), dict(name="CenterCrop", size=224),
                                     dict(name="ToTensor")])
    assert recipe.center_crop and recipe.resize == 256 and recipe.crop_sizes == [224]
    assert recipe.interpolation == "bicubic"
    alone = recipe_from_transforms([dict(name="CenterCrop", size=[96])])
    assert alone.center_crop and alone.resize is None and alone.crop_sizes == [96]


@pytest.mark.parametrize(
    ("transforms", "words"),
    [
        ([dict(name="RandomResizedCrop", size=32, interpolation=1)], "interpolation must be PIL's resampling code"),
        ([dict(name="Resize", size=64), dict(name="RandomResizedCrop", size=32)], "Resize needs a CenterCrop"),
        ([dict(name="CenterCrop", size=32), dict(name="Resize", size=64)], "Resize is supported once, before"),
        ([dict(name="ColorJitter", hue=0.6), SWAV[0]], "hue <= 0.5"),
        ([dict(name="ColorJitter"), SWAV[0], dict(name="RandomGrayscale")], "on both sides of the crop"),
        ([SWAV[0], dict(name="RandomGrayscale"), dict(name="ColorJitter")], "ColorJitter after RandomGrayscale"),
        ([dict(name="ImgPilGaussianBlur"), SWAV[0]], "ImgPilGaussianBlur before the crop is not supported"),
        ([SWAV[0], dict(name="ColorJitter"), dict(name="ImgPilColorDistortion")], "both set jitter_p"),
        ([dict(name="ImgReplicatePil"), dict(name="CenterCrop", size=32)], "ImgReplicatePil needs"),
    ],
)
def test_bad_torchvision_transforms_are_one_line_errors(transforms, words):
    with pytest.raises(ValueError) as error:
        recipe_from_transforms(transforms)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_color_jitter_takes_torchvisions_numbers_and_ranges_and_always_applies():
    """ClusterFit's recipe: torchvision's ColorJitter, x -> [max(0, 1 - x), 1 + x] (hue [-x, x]) or [min, max]."""
    ranges = recipe_from_transforms([dict(name="RandomResizedCrop", size=32), dict(
        name="ColorJitter", brightness=[0.6, 1.4], contrast=[0.6, 1.4], saturation=[0.6, 1.4], hue=[-0.2, 0.2])])
    crop = ranges.augmentations[0]
    assert crop.jitter_p == 1.0 and crop.gray_p == 0.0
    assert crop.brightness == crop.contrast == crop.saturation == (0.6, 1.4) and crop.hue == (-0.2, 0.2)
    numbers = recipe_from_transforms([dict(name="RandomResizedCrop", size=32),
                                      dict(name="ColorJitter", brightness=0.4, saturation=1.5, hue=0.1)])
    crop = numbers.augmentations[0]
    assert crop.brightness == (0.6, 1.4) and crop.contrast == (1.0, 1.0) and crop.saturation == (0.0, 2.5)
    assert crop.hue == (-0.1, 0.1)
    with pytest.raises(ValueError, match="ColorJitter brightness must be a number or a"):
        recipe_from_transforms([dict(name="RandomResizedCrop", size=32), dict(name="ColorJitter", brightness=[2, 1])])
