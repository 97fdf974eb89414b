"""recipe_from_transforms: VISSL transform lists -> MultiCropRecipe."""
from __future__ import annotations

import pytest

from loaders.recipe import blur_kernel_size, recipe_from_transforms

SWAV = [
    dict(name="ImgPilToMultiCrop", total_num_crops=8, num_crops=[2, 6], size_crops=[224, 96],
         crop_scales=[[0.14, 1], [0.05, 0.14]]),
    dict(name="RandomHorizontalFlip", p=0.5),
    dict(name="ImgPilColorDistortion", strength=1.0),
    dict(name="ImgPilGaussianBlur", p=0.5, radius_min=0.1, radius_max=2.0),
    dict(name="ToTensor"),
    dict(name="Normalize", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
]


def test_swav_multicrop():
    recipe = recipe_from_transforms(SWAV)
    assert recipe.size_crops == (224, 96) and recipe.num_crops == (2, 6)
    assert recipe.total_num_crops == 8
    assert recipe.crop_sizes == [224, 224] + [96] * 6
    assert recipe.crop_scales == ((0.14, 1.0), (0.05, 0.14))
    assert recipe.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert recipe.flip_p == 0.5 and recipe.color_strength == 1.0
    assert (recipe.color_p, recipe.gray_p) == (0.8, 0.2)
    assert recipe.blur_p == (0.5,) * 8 and recipe.blur_sigma == (0.1, 2.0)
    assert recipe.solarize_p == (0.0,) * 8
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
    assert recipe.blur_p == (1.0, 0.1) and recipe.solarize_p == (0.0, 0.2)
    assert recipe.color_strength == 0.5 and recipe.flip_p == 0.0
    assert recipe.mean == (0.0, 0.0, 0.0) and recipe.std == (1.0, 1.0, 1.0)  # no Normalize: plain [0, 1]


def test_random_apply_wrapper_and_single_crop():
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=[96], scale=[0.2, 1.0]),
        dict(name="ImgPilMultiCropRandomApply", transforms=[dict(name="ImgPilRandomSolarize", p=1.0)], prob=[0.0, 0.2]),
    ])
    assert recipe.solarize_p == (0.0, 0.2) and recipe.crop_scales == ((0.2, 1.0),)
    single = recipe_from_transforms([dict(name="RandomResizedCrop", size=64)])
    assert single.total_num_crops == 1 and single.crop_sizes == [64]


def test_per_group_probability_expands_to_crops():
    transforms = [SWAV[0], dict(name="ImgPilGaussianBlur", p=[0.9, 0.3])]
    assert recipe_from_transforms(transforms).blur_p == (0.9, 0.9) + (0.3,) * 6


@pytest.mark.parametrize(
    ("transforms", "words"),
    [
        ([SWAV[0], dict(name="RandomVerticalFlip")], "RandomVerticalFlip"),
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


def test_blur_kernel_is_odd_and_about_a_tenth():
    assert [blur_kernel_size(s) for s in (224, 160, 96, 64, 8)] == [23, 17, 9, 7, 3]
