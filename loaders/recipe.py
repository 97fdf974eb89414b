"""VISSL's DATA.TRAIN.TRANSFORMS list, parsed once into a frozen multi-crop recipe.

Every loader backend (torchvision, DALI, FFCV, the batched device path) reads the same
`MultiCropRecipe`, so the augmentation is specified in one place and each backend only
decides how to execute it.

Accepted transform names and their keys (anything else is a ValueError):
    ImgPilToMultiCrop       total_num_crops, num_crops, size_crops, crop_scales
    RandomResizedCrop       size, scale, ratio           (one crop; a single-crop recipe)
    ImgReplicatePil         num_times                    (that many copies of the crop, SimCLR/BYOL style)
    RandomHorizontalFlip    p
    ImgPilColorDistortion   strength                     (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8, gray p=0.2)
    ImgPilGaussianBlur      p, radius_min, radius_max    (p: a float or one value per crop)
    ImgPilRandomSolarize    p                            (p: a float or one value per crop)
    ImgPilMultiCropRandomApply  transforms, prob         (blur/solarize with one probability per crop)
    ToTensor
    Normalize               mean, std
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

# Defaults of the VISSL transforms when a key is omitted (VISSL's own defaults).
_DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_DEFAULT_RRC_SCALE = (0.08, 1.0)
_COLOR_P = 0.8
_GRAY_P = 0.2


@dataclass(frozen=True)
class MultiCropRecipe:
    """The multi-crop augmentation, one entry per crop group or per crop.

    size_crops: side of the square output of each crop group, e.g. (224, 96).
    num_crops: number of crops of each group, e.g. (2, 6).
    crop_scales: (min, max) area fraction of each group, e.g. ((0.14, 1.0), (0.05, 0.14)).
    crop_ratio: (min, max) aspect ratio (w / h) of every crop.
    flip_p: horizontal flip probability.
    color_strength: colour distortion strength s, or None without colour distortion.
    color_p, gray_p: probabilities of the colour jitter and of the grayscale conversion.
    blur_p, solarize_p: one probability per crop (len total_num_crops).
    blur_sigma: (min, max) of the Gaussian blur sigma, drawn uniformly.
    mean, std: per-channel normalisation of [0, 1] images.
    """

    size_crops: tuple[int, ...]
    num_crops: tuple[int, ...]
    crop_scales: tuple[tuple[float, float], ...]
    crop_ratio: tuple[float, float]
    flip_p: float
    color_strength: float | None
    color_p: float
    gray_p: float
    blur_p: tuple[float, ...]
    blur_sigma: tuple[float, float]
    solarize_p: tuple[float, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def total_num_crops(self) -> int:
        return sum(self.num_crops)

    @property
    def crop_sizes(self) -> list[int]:
        """Output side of every crop, in crop order (large crops first)."""
        return [size for size, count in zip(self.size_crops, self.num_crops) for _ in range(count)]

    @property
    def crop_groups(self) -> list[int]:
        """Group index of every crop, in crop order."""
        return [group for group, count in enumerate(self.num_crops) for _ in range(count)]


def blur_kernel_size(crop_size: int) -> int:
    """Side of the Gaussian blur kernel for a crop: about 10% of the crop, odd, at least 3
    (SimCLR's choice, which BYOL and SwAV inherit)."""
    return max(3, int(0.1 * crop_size) | 1)


def recipe_from_transforms(transforms: Sequence[dict[str, Any]]) -> MultiCropRecipe:
    """Parse a VISSL transform list (plain dicts, e.g. DATA.TRAIN.TRANSFORMS) into a recipe.

    Raises ValueError with a one-line message on an unknown transform name, a missing crop
    transform, or inconsistent crop counts.
    """
    crop: dict[str, Any] | None = None
    replicate = 1
    flip_p = 0.0
    color_strength = None
    blur_p: Any = 0.0
    blur_sigma = (0.1, 2.0)
    solarize_p: Any = 0.0
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for transform in transforms:
        name = transform.get("name")
        if name in ("ImgPilToMultiCrop", "RandomResizedCrop"):
            if crop is not None:
                raise ValueError(f"transforms: a second crop transform {name!r}; give exactly one")
            crop = _parse_crop(transform)
        elif name == "ImgReplicatePil":
            replicate = int(transform.get("num_times", 2))
        elif name == "RandomHorizontalFlip":
            flip_p = float(transform.get("p", 0.5))
        elif name == "ImgPilColorDistortion":
            color_strength = float(transform.get("strength", 1.0))
        elif name == "ImgPilGaussianBlur":
            blur_p = transform.get("p", 0.5)
            blur_sigma = (float(transform.get("radius_min", 0.1)), float(transform.get("radius_max", 2.0)))
        elif name == "ImgPilRandomSolarize":
            solarize_p = transform.get("p", 0.2)
        elif name == "ImgPilMultiCropRandomApply":
            inner, prob = _parse_random_apply(transform)
            if inner["name"] == "ImgPilGaussianBlur":
                blur_p = _scale_p(prob, inner.get("p", 1.0))
                blur_sigma = (float(inner.get("radius_min", 0.1)), float(inner.get("radius_max", 2.0)))
            else:
                solarize_p = _scale_p(prob, inner.get("p", 1.0))
        elif name == "ToTensor":
            pass
        elif name == "Normalize":
            mean = tuple(float(v) for v in transform["mean"])
            std = tuple(float(v) for v in transform["std"])
        else:
            raise ValueError(f"transforms: unknown transform name {name!r}")
    if crop is None:
        raise ValueError("transforms: no crop transform; add ImgPilToMultiCrop or RandomResizedCrop")
    if replicate != 1:
        if len(crop["num_crops"]) != 1 or crop["num_crops"][0] != 1:
            raise ValueError("transforms: ImgReplicatePil needs a single RandomResizedCrop")
        crop["num_crops"] = (replicate,)
    if sum(crop["num_crops"]) < 1:
        raise ValueError("transforms: the crop transform makes no crops")
    return MultiCropRecipe(
        size_crops=crop["size_crops"],
        num_crops=crop["num_crops"],
        crop_scales=crop["crop_scales"],
        crop_ratio=crop["crop_ratio"],
        flip_p=flip_p,
        color_strength=color_strength,
        color_p=_COLOR_P,
        gray_p=_GRAY_P,
        blur_p=_per_crop(blur_p, crop["num_crops"], name="ImgPilGaussianBlur p"),
        blur_sigma=blur_sigma,
        solarize_p=_per_crop(solarize_p, crop["num_crops"], name="ImgPilRandomSolarize p"),
        mean=_three(mean, "Normalize mean"),
        std=_three(std, "Normalize std"),
    )


def _parse_crop(transform: dict[str, Any]) -> dict[str, Any]:
    if transform["name"] == "RandomResizedCrop":
        size = transform["size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return dict(
            size_crops=(int(size),),
            num_crops=(1,),
            crop_scales=(_pair(transform.get("scale", _DEFAULT_RRC_SCALE), "RandomResizedCrop scale"),),
            crop_ratio=_pair(transform.get("ratio", _DEFAULT_RATIO), "RandomResizedCrop ratio"),
        )
    size_crops = tuple(int(s) for s in transform["size_crops"])
    num_crops = tuple(int(n) for n in transform["num_crops"])
    crop_scales = tuple(_pair(s, "ImgPilToMultiCrop crop_scales") for s in transform["crop_scales"])
    total = int(transform.get("total_num_crops", sum(num_crops)))
    if not (len(size_crops) == len(num_crops) == len(crop_scales)):
        raise ValueError(
            f"ImgPilToMultiCrop: size_crops {list(size_crops)}, num_crops {list(num_crops)} and "
            f"crop_scales {[list(s) for s in crop_scales]} must have one entry per crop group"
        )
    if sum(num_crops) != total:
        raise ValueError(
            f"ImgPilToMultiCrop: sum(num_crops) = {sum(num_crops)} != total_num_crops = {total}"
        )
    return dict(size_crops=size_crops, num_crops=num_crops, crop_scales=crop_scales, crop_ratio=_DEFAULT_RATIO)


def _parse_random_apply(transform: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    inner = transform.get("transforms", [])
    if len(inner) != 1 or inner[0].get("name") not in ("ImgPilGaussianBlur", "ImgPilRandomSolarize"):
        raise ValueError(
            "ImgPilMultiCropRandomApply: supported only around one ImgPilGaussianBlur or ImgPilRandomSolarize"
        )
    return inner[0], transform["prob"]


def _scale_p(prob: Any, inner_p: Any) -> list[float] | float:
    """The probability of applying a wrapped transform: outer prob times its own p."""
    if isinstance(prob, (list, tuple)):
        return [float(p) * float(inner_p) for p in prob]
    return float(prob) * float(inner_p)


def _per_crop(p: Any, num_crops: tuple[int, ...], *, name: str) -> tuple[float, ...]:
    """Expand a probability given as a float, one per crop, or one per crop group to one per crop."""
    total = sum(num_crops)
    if not isinstance(p, (list, tuple)):
        values = [float(p)] * total
    elif len(p) == total:
        values = [float(v) for v in p]
    elif len(p) == len(num_crops):
        values = [float(v) for v, count in zip(p, num_crops) for _ in range(count)]
    else:
        raise ValueError(f"{name}: {len(p)} values for {total} crops in {len(num_crops)} groups")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name}: probabilities {values} must lie in [0, 1]")
    return tuple(values)


def _pair(value: Any, name: str) -> tuple[float, float]:
    if len(value) != 2 or not float(value[0]) <= float(value[1]) or math.isnan(float(value[0])):
        raise ValueError(f"{name}: {list(value)} is not a (min, max) pair")
    return float(value[0]), float(value[1])


def _three(value: tuple[float, ...], name: str) -> tuple[float, float, float]:
    if len(value) != 3:
        raise ValueError(f"{name}: {list(value)} needs one value per RGB channel")
    return value[0], value[1], value[2]
