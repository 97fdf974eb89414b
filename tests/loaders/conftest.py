"""Shared fixtures: a tiny synthetic dataset and small recipes."""
from __future__ import annotations

import pytest

from loaders.recipe import recipe_from_transforms
from loaders.synthetic import ensure_synthetic_dataset

TINY = dict(image_size=32, train_per_class=4, val_per_class=2)  # test_build.py repeats these


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A 10-class synthetic dataset: 40 train and 20 val images of 32x32."""
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", seed=0, **TINY)


def multicrop_transforms(*, large=24, small=12, num_large=2, num_small=2, blur_p=0.5, solarize_p=0.2):
    return [
        dict(name="ImgPilToMultiCrop", total_num_crops=num_large + num_small, num_crops=[num_large, num_small],
             size_crops=[large, small], crop_scales=[[0.14, 1], [0.05, 0.14]]),
        dict(name="RandomHorizontalFlip", p=0.5),
        dict(name="ImgPilColorDistortion", strength=1.0),
        dict(name="ImgPilGaussianBlur", p=blur_p, radius_min=0.1, radius_max=2.0),
        dict(name="ImgPilRandomSolarize", p=solarize_p),
        dict(name="ToTensor"),
        dict(name="Normalize", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]


@pytest.fixture
def small_recipe():
    """2 crops of 24 + 2 crops of 12, every augmentation on."""
    return recipe_from_transforms(multicrop_transforms())
