"""The accepted DATA.TRAIN.TRANSFORMS entries (`TRANSFORM_KEYS`) and the check of one entry against
them (`checked_keys`). Kept apart from loaders/recipe.py, which resolves a checked list into a
multi-crop recipe, so that what a transform accepts reads in one place.

Every entry is checked against TRANSFORM_KEYS, the one table of the accepted transforms, their
keys, the type of each and its default (VISSL's defaults; REQUIRED: no default): an unknown
transform, an unknown key, a missing required key or a value of the wrong type is a one-line
ValueError naming the transform, the key and the closest valid key.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, NamedTuple

REQUIRED = object()  # a key without a default


class Kind(NamedTuple):
    """A key's type: what it must be (for the error message) and how to check and convert it."""

    description: str
    convert: Callable[[Any], Any]  # raises TypeError or ValueError when the value does not fit


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def _list_of(convert: Callable[[Any], Any], *, length: int | None = None) -> Callable[[Any], tuple]:
    def convert_list(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            raise TypeError
        return tuple(convert(item) for item in value)
    return convert_list


def _probability(value: Any) -> float:
    value = _number(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError
    return value


def _probabilities(value: Any) -> float | tuple[float, ...]:
    return _list_of(_probability)(value) if isinstance(value, (list, tuple)) else _probability(value)


def _range(value: Any) -> tuple[float, float]:
    low, high = _list_of(_number, length=2)(value)
    if low > high:
        raise ValueError
    return low, high


def _jitter_amount(value: Any) -> float | tuple[float, float]:
    """ColorJitter's brightness, contrast, saturation or hue: a number x or a [min, max] pair (torchvision's)."""
    return _range(value) if isinstance(value, (list, tuple)) else _number(value)


def _size(value: Any) -> int:
    """RandomResizedCrop's size: an int or [int] (square crops only)."""
    return _list_of(_integer, length=1)(value)[0] if isinstance(value, (list, tuple)) else _integer(value)


def _interpolation(value: Any) -> str:
    """PIL's resampling code, as torchvision's transforms take it: 2 bilinear, 3 bicubic."""
    code = _integer(value)
    if code not in _INTERPOLATIONS:
        raise ValueError
    return _INTERPOLATIONS[code]


_INTERPOLATIONS = {2: "bilinear", 3: "bicubic"}


def _transform_list(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
        raise TypeError
    return tuple(value)


NUMBER = Kind("a number", _number)


def _positive_integer(value: Any) -> int:
    if _integer(value) <= 0:
        raise ValueError
    return value


COUNT = Kind("a positive integer", _positive_integer)
COUNTS = Kind("a list of positive integers", _list_of(_positive_integer))
PROBABILITY = Kind("a probability in [0, 1]", _probability)
PROBABILITIES = Kind("a probability in [0, 1], or a list of them (one per crop or crop group)", _probabilities)
RANGE = Kind("a [min, max] pair of numbers", _range)


def _area_share(value: Any) -> tuple[float, float]:
    """A crop's share of the image area: a [min, max] pair with 0 < min <= max <= 1."""
    low, high = _range(value)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError
    return low, high


AREA = Kind("a [min, max] share of the image area with 0 < min <= max <= 1", _area_share)
AREAS = Kind("a list of [min, max] shares of the image area, each with 0 < min <= max <= 1", _list_of(_area_share))
SIZE = Kind("an integer or [integer]", _size)
INTERPOLATION = Kind("PIL's resampling code 2 (bilinear) or 3 (bicubic)", _interpolation)
RGB = Kind("a list of 3 numbers (R, G, B)", _list_of(_number, length=3))
TRANSFORMS = Kind("a list of transforms", _transform_list)
JITTER = Kind("a number or a [min, max] pair of numbers", _jitter_amount)


class Key(NamedTuple):
    kind: Kind
    default: Any = REQUIRED


# Every accepted transform: {key: Key(type, default)}.
TRANSFORM_KEYS: dict[str, dict[str, Key]] = {
    "ImgPilToMultiCrop": {  # total_num_crops None: sum(num_crops)
        "total_num_crops": Key(COUNT, None), "num_crops": Key(COUNTS), "size_crops": Key(COUNTS),
        "crop_scales": Key(AREAS)},
    "RandomResizedCrop": {  # one crop: a single-crop recipe
        "size": Key(SIZE), "scale": Key(AREA, (0.08, 1.0)), "ratio": Key(RANGE, (3.0 / 4.0, 4.0 / 3.0)),
        "interpolation": Key(INTERPOLATION, "bilinear")},
    "CenterCrop": {"size": Key(SIZE)},  # with an optional Resize before it: the deterministic single crop
    "Resize": {"size": Key(SIZE), "interpolation": Key(INTERPOLATION, "bilinear")},  # the short side to size
    "ImgReplicatePil": {"num_times": Key(COUNT, 2)},  # that many copies of the one crop (SimCLR, BYOL)
    "RandomHorizontalFlip": {"p": Key(PROBABILITY, 0.5)},
    # torchvision's ColorJitter: always applied; x gives factors in [max(0, 1 - x), 1 + x] (hue: [-x, x]), or a
    # [min, max] pair directly (ClusterFit's recipe).
    "ColorJitter": {"brightness": Key(JITTER, 0.0), "contrast": Key(JITTER, 0.0), "saturation": Key(JITTER, 0.0),
                    "hue": Key(JITTER, 0.0)},
    "RandomGrayscale": {"p": Key(PROBABILITY, 0.1)},
    "ImgPilColorDistortion": {  # ColorJitter(b s, c s, sat s, h s) with p color_jitter_probability, then gray
        "strength": Key(NUMBER, 1.0), "brightness": Key(NUMBER, 0.8), "contrast": Key(NUMBER, 0.8),
        "saturation": Key(NUMBER, 0.8), "hue": Key(NUMBER, 0.2), "color_jitter_probability": Key(PROBABILITY, 0.8),
        "grayscale_probability": Key(PROBABILITY, 0.2)},
    "ImgPilGaussianBlur": {
        "p": Key(PROBABILITIES, 0.5), "radius_min": Key(NUMBER, 0.1), "radius_max": Key(NUMBER, 2.0)},
    "ImgPilRandomSolarize": {"p": Key(PROBABILITIES, 0.66)},
    # One ImgPilGaussianBlur or ImgPilRandomSolarize, applied to crop i with probability prob[i].
    "ImgPilMultiCropRandomApply": {"transforms": Key(TRANSFORMS), "prob": Key(PROBABILITIES)},
    "ToTensor": {},
    "Normalize": {"mean": Key(RGB), "std": Key(RGB)},
}


def checked_keys(transform: Any) -> tuple[str, dict[str, Any]]:
    """(name, {key: value}) of one transform entry, every key of its TRANSFORM_KEYS entry present
    (defaults filled in) and converted; a one-line ValueError on anything else."""
    supported = ", ".join(TRANSFORM_KEYS)
    if not isinstance(transform, dict) or "name" not in transform:
        raise ValueError(f"transforms: {transform!r} is not a transform (a dict with a name); supported: {supported}")
    name = transform["name"]
    if name not in TRANSFORM_KEYS:
        close = difflib.get_close_matches(str(name), TRANSFORM_KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"transforms: unknown transform {name!r}{hint}; supported: {supported}")
    schema = TRANSFORM_KEYS[name]
    for key in transform:
        if key != "name" and key not in schema:
            if not schema:
                raise ValueError(f"transforms: {name} has no key {key!r}; it takes none")
            closest = difflib.get_close_matches(str(key), schema, n=1, cutoff=0.0)[0]
            raise ValueError(f"transforms: {name} has no key {key!r}; did you mean {closest!r}?")
    values = {}
    for key, (kind, default) in schema.items():
        if key not in transform:
            if default is REQUIRED:
                raise ValueError(f"transforms: {name} needs key {key!r} ({kind.description})")
            values[key] = default
            continue
        try:
            values[key] = kind.convert(transform[key])
        except (TypeError, ValueError):
            raise ValueError(
                f"transforms: {name} {key} must be {kind.description}, got {transform[key]!r}") from None
    return name, values
