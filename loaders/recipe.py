"""VISSL's DATA.TRAIN.TRANSFORMS list, checked and parsed once into a frozen multi-crop recipe.

Every loader backend (the torchvision reference in loaders/folder.py, DALI in loaders/dali.py,
the batched path in loaders/augment.py) reads the same `MultiCropRecipe`. The parser resolves
each transform into plain per-crop values (`CropAugmentation`: probabilities and the ranges
that random parameters are drawn from), so the backends never see a transform's name or its
own parametrisation (a colour distortion "strength", VISSL's per-crop RandomApply wrapper):
asymmetric views (BYOL's blur and solarize per view) and a new transform need no change there.
Adding a transform takes an entry in TRANSFORM_KEYS (loaders/transform_keys.py) and the values it
resolves to in `_resolve_photometric`.

Order follows VISSL's list where it changes the result: a colour transform (ColorJitter,
RandomGrayscale, ImgPilColorDistortion) listed before the crop applies to the whole image, so
all the crops of an image share one colour draw (`colour_per_image`), and contrast pivots at the
whole image's mean grey; listed after the crop, each crop draws its own. A flip commutes with
the crop in distribution, so its place does not matter; blur and solarize must follow the crop.
Resize then CenterCrop is the deterministic single crop of evaluation (`center_crop`).

Every entry is first checked against TRANSFORM_KEYS (`checked_keys`, loaders/transform_keys.py):
anything it does not accept is a one-line ValueError naming the closest valid key.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from loaders.transform_keys import TRANSFORM_KEYS, checked_keys

_CROP_TRANSFORMS = ("ImgPilToMultiCrop", "RandomResizedCrop", "CenterCrop")
_COLOUR_TRANSFORMS = ("ColorJitter", "RandomGrayscale", "ImgPilColorDistortion")
_WRAPPABLE = ("ImgPilGaussianBlur", "ImgPilRandomSolarize")


@dataclass(frozen=True)
class CropAugmentation:
    """What happens to one crop after it is cut and resized, resolved to plain values.

    flip_p: probability of a horizontal flip.
    jitter_p: probability of the colour jitter: brightness, contrast, saturation and hue
        adjustments in a random order (torchvision's ColorJitter), each with a factor drawn
        uniformly from its range.
    brightness, contrast, saturation: (min, max) factor ranges; (1, 1) leaves the property alone.
    hue: (min, max) hue shift in turns; (0, 0) leaves it alone.
    gray_p: probability of the grayscale conversion, after the jitter.
    blur_p: probability of a Gaussian blur, its sigma drawn uniformly from blur_sigma (min, max).
    solarize_p: probability of solarizing (inverting values >= 128 of 255).
    """

    flip_p: float
    jitter_p: float
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: tuple[float, float]
    gray_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    solarize_p: float

    @property
    def distorts_colour(self) -> bool:
        """Whether the colour stage (jitter, then grayscale) runs at all: the backends draw its
        random decisions only then."""
        return self.jitter_p > 0 or self.gray_p > 0


# A crop that no transform touches. blur_sigma is unused at blur_p 0, but valid.
IDENTITY = CropAugmentation(flip_p=0.0, jitter_p=0.0, brightness=(1.0, 1.0), contrast=(1.0, 1.0),
                            saturation=(1.0, 1.0), hue=(0.0, 0.0), gray_p=0.0, blur_p=0.0, blur_sigma=(1.0, 1.0),
                            solarize_p=0.0)
_PER_CROP_FIELDS = ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p")  # may differ from crop to crop


@dataclass(frozen=True)
class MultiCropRecipe:
    """The multi-crop augmentation: the geometry per crop group, the rest per crop.

    size_crops: side of the square output of each crop group, e.g. (224, 96).
    num_crops: number of crops of each group, e.g. (2, 6).
    crop_scales: (min, max) area fraction of each group, e.g. ((0.14, 1.0), (0.05, 0.14)).
    crop_ratio: (min, max) aspect ratio (w / h) of every crop.
    augmentations: what happens to each crop after the crop, in crop order (len total_num_crops).
    mean, std: per-channel normalisation of [0, 1] images.
    interpolation: the resize of a crop, 'bilinear' or 'bicubic' (torchvision's, antialiased).
    colour_per_image: the colour stage (jitter, grayscale) was listed before the crop: it applies
        to the whole image, one draw per image shared by all its crops (every crop's colour values
        are then the same).
    center_crop: the deterministic single crop of evaluation: the short side resized to `resize`
        (None: not resized), then the centre size_crops[0] square; crop_scales is then unused.
    """

    size_crops: tuple[int, ...]
    num_crops: tuple[int, ...]
    crop_scales: tuple[tuple[float, float], ...]
    crop_ratio: tuple[float, float]
    augmentations: tuple[CropAugmentation, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    colour_per_image: bool = False
    center_crop: bool = False
    resize: int | None = None

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


def recipe_from_transforms(transforms: Sequence[dict[str, Any]]) -> MultiCropRecipe:
    """Check and parse a VISSL transform list (plain dicts, e.g. DATA.TRAIN.TRANSFORMS) into a recipe.

    Raises ValueError with a one-line message on an unknown transform, key or type, a missing
    crop transform, inconsistent crop counts, or two transforms setting the same value.
    """
    crop: dict[str, Any] | None = None
    resize: dict[str, Any] | None = None
    replicate = 1
    resolved: dict[str, Any] = {}  # CropAugmentation field -> a value for every crop, or a list per crop/group
    set_by: dict[str, str] = {}
    colour_before_crop: dict[str, bool] = {}  # colour transform -> listed before the crop
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for transform in transforms:
        name, keys = checked_keys(transform)
        if name in _CROP_TRANSFORMS:
            if crop is not None:
                raise ValueError(f"transforms: a second crop transform {name!r}; give exactly one")
            crop = _parse_crop(name, keys, resize)
        elif name == "Resize":
            if crop is not None or resize is not None:
                raise ValueError("transforms: Resize is supported once, before CenterCrop")
            resize = keys
        elif name == "ImgReplicatePil":
            replicate = keys["num_times"]
        elif name == "Normalize":
            mean, std = keys["mean"], keys["std"]
        elif name != "ToTensor":
            if crop is None and name not in (*_COLOUR_TRANSFORMS, "RandomHorizontalFlip"):
                raise ValueError(f"transforms: {name} before the crop is not supported; list it after the crop")
            if name in _COLOUR_TRANSFORMS:
                if "RandomGrayscale" in set_by.values() and name != "RandomGrayscale":
                    raise ValueError(f"transforms: {name} after RandomGrayscale is not supported; "
                                     "the colour jitter comes first")
                colour_before_crop[name] = crop is None
            for field, value in _resolve_photometric(name, keys).items():
                if field in set_by:
                    raise ValueError(f"transforms: {name} and {set_by[field]} both set {field}; give one")
                resolved[field], set_by[field] = value, name
    if resize is not None and (crop is None or not crop.get("center_crop")):
        raise ValueError("transforms: Resize needs a CenterCrop after it")
    if len(set(colour_before_crop.values())) > 1:
        raise ValueError(f"transforms: {' and '.join(colour_before_crop)} on both sides of the crop; "
                         "list them together, before or after it")
    if crop is None:
        raise ValueError("transforms: no crop transform; add ImgPilToMultiCrop or RandomResizedCrop")
    if replicate != 1:
        if crop["num_crops"] != (1,) or crop.get("center_crop"):
            raise ValueError("transforms: ImgReplicatePil needs a single RandomResizedCrop")
        crop["num_crops"] = (replicate,)
    if sum(crop["num_crops"]) < 1:
        raise ValueError("transforms: the crop transform makes no crops")
    per_crop = {field: _per_crop(resolved.pop(field), crop["num_crops"], name=set_by[field])
                for field in _PER_CROP_FIELDS if field in resolved}
    augmentations = tuple(
        replace(IDENTITY, **resolved, **{field: values[crop_index] for field, values in per_crop.items()})
        for crop_index in range(sum(crop["num_crops"])))
    return MultiCropRecipe(augmentations=augmentations, mean=mean, std=std,
                           colour_per_image=any(colour_before_crop.values()), **crop)


def _resolve_photometric(name: str, keys: dict[str, Any]) -> dict[str, Any]:
    """The CropAugmentation fields that a photometric transform sets. A probability may be one
    value for every crop or a list per crop or crop group (expanded later)."""
    if name == "RandomHorizontalFlip":
        return {"flip_p": keys["p"]}
    if name == "ColorJitter":
        numbers = {key: value for key, value in keys.items() if not isinstance(value, tuple)}
        if any(value < 0 for value in numbers.values()) or numbers.get("hue", 0.0) > 0.5:
            raise ValueError(f"transforms: ColorJitter needs values >= 0 and hue <= 0.5, got {keys}")
        ranges = _jitter_ranges(*(numbers.get(key, 0.0) for key in ("brightness", "contrast", "saturation", "hue")))
        return {"jitter_p": 1.0, **ranges, **{key: value for key, value in keys.items() if isinstance(value, tuple)}}
    if name == "RandomGrayscale":
        return {"gray_p": keys["p"]}
    if name == "ImgPilColorDistortion":
        # VISSL's (SimCLR's) colour distortion of strength s; each jitter key is scaled by s, as in VISSL's
        # ImgPilColorDistortion (BYOL's recipe: s 0.5, saturation 0.4 -> jitter 0.4, 0.4, 0.2, 0.1).
        s = keys["strength"]
        return {"jitter_p": keys["color_jitter_probability"],
                **_jitter_ranges(keys["brightness"] * s, keys["contrast"] * s, keys["saturation"] * s, keys["hue"] * s),
                "gray_p": keys["grayscale_probability"]}
    if name == "ImgPilGaussianBlur":
        return {"blur_p": keys["p"], "blur_sigma": _ordered(keys["radius_min"], keys["radius_max"], name)}
    if name == "ImgPilRandomSolarize":
        return {"solarize_p": keys["p"]}
    if name == "ImgPilMultiCropRandomApply":
        inner = keys["transforms"]
        if len(inner) != 1 or inner[0].get("name") not in _WRAPPABLE:
            raise ValueError(f"transforms: {name} is supported around one of {', '.join(_WRAPPABLE)} only")
        fields = _resolve_photometric(*checked_keys(inner[0]))
        probability = next(field for field in fields if field.endswith("_p"))
        fields[probability] = _scale(keys["prob"], fields[probability])
        return fields
    raise AssertionError(f"{name} is in TRANSFORM_KEYS but not resolved")


def _jitter_ranges(brightness: float, contrast: float, saturation: float, hue: float) -> dict[str, tuple]:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) as factor ranges: a
    factor in [max(0, 1 - x), 1 + x] for the first three, a hue shift in [-hue, hue] turns."""
    return {"brightness": (max(0.0, 1.0 - brightness), 1.0 + brightness),
            "contrast": (max(0.0, 1.0 - contrast), 1.0 + contrast),
            "saturation": (max(0.0, 1.0 - saturation), 1.0 + saturation),
            "hue": (-hue, hue)}


def _ordered(low: float, high: float, name: str) -> tuple[float, float]:
    if not 0 < low <= high:
        raise ValueError(f"transforms: {name} radius_min {low} and radius_max {high} need 0 < min <= max")
    return low, high


def _scale(prob: float | tuple[float, ...], inner_p: float | tuple[float, ...]) -> float | tuple[float, ...]:
    """The probability of a wrapped transform: the wrapper's prob (per crop) times its own p."""
    if isinstance(inner_p, tuple):
        raise ValueError("transforms: a transform inside ImgPilMultiCropRandomApply takes one p; "
                         "give the per-crop values in prob")
    if isinstance(prob, tuple):
        return tuple(p * inner_p for p in prob)
    return prob * inner_p


def _per_crop(p: float | tuple[float, ...], num_crops: tuple[int, ...], *, name: str) -> tuple[float, ...]:
    """Expand a probability given as a float, one per crop, or one per crop group to one per crop."""
    total = sum(num_crops)
    if not isinstance(p, tuple):
        return (p,) * total
    if len(p) == total:
        return p
    if len(p) == len(num_crops):
        return tuple(v for v, count in zip(p, num_crops) for _ in range(count))
    raise ValueError(f"transforms: {name}: {len(p)} values for {total} crops in {len(num_crops)} groups")


def _parse_crop(name: str, keys: dict[str, Any], resize: dict[str, Any] | None) -> dict[str, Any]:
    if name == "CenterCrop":
        # Resize's interpolation is the resize of the centre crop; crop_scales is unused.
        return dict(size_crops=(keys["size"],), num_crops=(1,), crop_scales=((1.0, 1.0),), crop_ratio=(1.0, 1.0),
                    center_crop=True, resize=None if resize is None else resize["size"],
                    interpolation="bilinear" if resize is None else resize["interpolation"])
    if name == "RandomResizedCrop":
        return dict(size_crops=(keys["size"],), num_crops=(1,), crop_scales=(keys["scale"],), crop_ratio=keys["ratio"],
                    interpolation=keys["interpolation"])
    size_crops, num_crops, crop_scales = keys["size_crops"], keys["num_crops"], keys["crop_scales"]
    if not (len(size_crops) == len(num_crops) == len(crop_scales)):
        raise ValueError(
            f"transforms: ImgPilToMultiCrop size_crops {list(size_crops)}, num_crops {list(num_crops)} and "
            f"crop_scales {[list(s) for s in crop_scales]} must have one entry per crop group"
        )
    total = keys["total_num_crops"]
    if total is not None and sum(num_crops) != total:
        raise ValueError(
            f"transforms: ImgPilToMultiCrop sum(num_crops) = {sum(num_crops)} != total_num_crops = {total}"
        )
    return dict(size_crops=size_crops, num_crops=num_crops, crop_scales=crop_scales,
                crop_ratio=TRANSFORM_KEYS["RandomResizedCrop"]["ratio"].default)
