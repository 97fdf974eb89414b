"""The built-in dataset: procedurally drawn shapes and textures, generated on first use.

Ten classes whose identity is carried by shape or texture only: every image draws its colours,
position, scale, rotation and texture period at random, independently of its class. Textures
fill the whole image and each shape is large (a third to a half of the image across), so even a
small crop shows class evidence (an edge, a corner, a period).

Why muted colours and a fixed polarity (light on dark): SwAV learns whatever the two views of an
image share, and it starts from a random network, whose features are dominated by global colour
and brightness. With saturated random colours and random brightness (the first version of this
dataset), the views either share colour (weak colour distortion: SwAV clusters by colour and its
features get worse than random for the class) or share too little that a random network sees
(strong distortion: SwAV sits at its ln K plateau for the whole of a CPU-sized run). Measured on
this dataset at 32 px with a ResNet-18 and 2x32 + 4x16 crops, both happened within 400 steps.
Muted colours keep hue and saturation as nuisances that the colour distortion removes, while the
shape stays the strongest thing the views share, so SwAV leaves its plateau within the demo's
budget and its features beat a random trunk's (benchmarks/RESULTS.md).

Layout (ImageFolder): <root>/train/<class>/00000.jpg and <root>/val/<class>/00000.jpg, plus a
manifest recording the generation parameters; <root> is named for the parameters, inside the cache or
DATA.TRAIN.SYNTHETIC.ROOT. Generation writes to a temporary sibling
directory and renames it into place, so a killed run never leaves half a dataset behind.
"""
from __future__ import annotations

import colorsys
import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from loaders.cache import cache_dir

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "circle", "square", "triangle", "star", "ring", "cross",
    "stripes", "checkerboard", "dots", "grid",
)
_TEXTURES = {"stripes", "checkerboard", "dots", "grid"}
# Bump when the drawing changes, so caches made by an older generator are not reused.
_GENERATOR_VERSION = 2
# Colours are muted (see the module docstring for why); the hue is uniform.
MAX_SATURATION = 0.1
MANIFEST_NAME = "fastssl-synthetic.json"
_STAGING_MARK = "fastssl-staging.json"  # in a staging folder: the host and process generating into it
_SPLIT_CODES = {"train": 0, "val": 1}


def ensure_synthetic_dataset(
    root: str | os.PathLike | None = None,
    *,
    image_size: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
) -> Path:
    """Return the root of the synthetic dataset, generating it first if needed.

    root: a folder that holds datasets, each in a folder named for its parameters (<root>/synthetic-<params>),
    or one such dataset folder itself; None: $FASTSSL_CACHE (or ~/.cache/fastssl). Other parameters make
    another folder beside the first, so changing them deletes nothing. A dataset folder whose manifest is
    fastssl's but of other parameters (an older generator) is replaced; one without a manifest that holds
    anything is refused (ValueError): only what fastssl wrote is ever removed.
    """
    params = {
        "version": _GENERATOR_VERSION, "image_size": int(image_size), "seed": int(seed),
        "train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
        "classes": list(CLASS_NAMES),
    }
    parent = cache_dir() if root is None else Path(root).expanduser()
    if _read_manifest(parent) == params:  # the dataset folder itself
        return parent
    root = parent / f"synthetic-{image_size}px-{train_per_class}x{val_per_class}-seed{seed}-v{_GENERATOR_VERSION}"
    if _read_manifest(root) == params:
        return root
    if root.exists() and any(root.iterdir()) and _read_manifest(root) is None:
        raise ValueError(f"synthetic dataset: {root} is a non-empty directory without {MANIFEST_NAME}")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    _check_disk_space(root.parent, num_images=len(CLASS_NAMES) * (train_per_class + val_per_class),
                      image_size=image_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    (staging / _STAGING_MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            _write_split(staging / split, split=split, per_class=per_class, image_size=image_size, seed=seed)
        (staging / MANIFEST_NAME).write_text(json.dumps(params, indent=1))
        _move_into_place(staging, root, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("synthetic dataset ready at %s", root)
    return root


def _remove_stale_staging(root: Path) -> None:
    """Remove the staging folders that a generation of `root` killed with SIGKILL left behind: only those that
    carry fastssl's staging mark, written on this host by a process that no longer exists."""
    for staging in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            mark = json.loads((staging / _STAGING_MARK).read_text())
            if mark["host"] != socket.gethostname() or _process_exists(int(mark["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not fastssl's, or not readable: left alone
        log.info("removing %s, left by an interrupted generation (process %s)", staging, mark["pid"])
        shutil.rmtree(staging, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A JPEG of the built-in dataset takes about 1.2 kB + 0.3 bytes a pixel at quality 90 (measured: 1.1 kB at
# 32 px, 2.3 kB at 64 px, 180 kB at 1024 px), and a file at least one 4 kB block.
def _check_disk_space(directory: Path, *, num_images: int, image_size: int) -> None:
    """ValueError (one line) before anything is written when the dataset would not fit the free disk space."""
    per_image = -(-(1200 + 0.3 * image_size**2) // 4096) * 4096
    needed, free = int(num_images * per_image), shutil.disk_usage(directory).free
    if needed > free:
        raise ValueError(f"synthetic dataset: {num_images} images of {image_size} px need about {needed / 1e9:.1f} GB; "
                         f"{directory} has {free / 1e9:.1f} GB free")


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(staging: Path, root: Path, params: dict) -> None:
    """Rename staging to root; tolerate another process (another rank) having won the race."""
    if root.exists():
        # fastssl's own dataset of other parameters, or an empty directory (checked by the caller, and again
        # here: another process may have written into it since): move it aside first.
        if _read_manifest(root) is None and any(root.iterdir()):
            raise ValueError(f"synthetic dataset: {root} is a non-empty directory without {MANIFEST_NAME}")
        stale = root.parent / f".{root.name}.stale-{os.getpid()}"
        os.rename(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, root)
    except OSError:
        if _read_manifest(root) != params:
            raise


def _write_split(directory: Path, *, split: str, per_class: int, image_size: int, seed: int) -> None:
    jobs = [(directory / name, split, label, per_class, image_size, seed) for label, name in enumerate(CLASS_NAMES)]
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers == 1 or per_class * len(jobs) < 1000:
        for job in jobs:
            _write_class(job)
        return
    # Drawing costs ~1 ms an image: worth a few processes for datasets of thousands. Leaving the block on
    # an exception (a stop during set-up, a full disk) terminates the workers before the staging folder goes.
    with multiprocessing.get_context("fork").Pool(workers, initializer=_default_signals) as pool:
        pool.map(_write_class, jobs, chunksize=1)


def _default_signals() -> None:
    # A worker inherits fastssl-train's SIGTERM / SIGUSR1 handler (dist.StopOnSignal); Pool.terminate's
    # SIGTERM must end it, as by default.
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)


def _write_class(job: tuple[Path, str, int, int, int, int]) -> None:
    class_dir, split, label, per_class, image_size, seed = job
    class_dir.mkdir(parents=True)
    for i in range(per_class):
        # One stream per image: the dataset does not depend on the order of generation.
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], label, i])
        pixels = draw_image(CLASS_NAMES[label], size=image_size, rng=rng)
        Image.fromarray(pixels).save(class_dir / f"{i:05d}.jpg", quality=90)


def draw_image(name: str, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `name`, all nuisance factors drawn from rng.

    A light, muted foreground (value 0.7 to 1) on a dark, muted plain background (value 0 to 0.35),
    each of random hue and saturation up to MAX_SATURATION; one shape (circumradius 32% to 45% of
    the image) at a random position and rotation, or a texture of random period, phase and angle;
    a little sensor noise.
    """
    background = _muted_colour(rng, value_range=(0.0, 0.35))
    foreground = _muted_colour(rng, value_range=(0.7, 1.0))
    if name in _TEXTURES:
        alpha = _texture_alpha(name, size, rng)
    else:
        radius = size * rng.uniform(0.32, 0.45)
        centre = rng.uniform(0.5 * radius, size - 0.5 * radius, size=2)
        alpha = _shape_alpha(name, size, centre, radius, rng.uniform(0, 2 * np.pi))
    image = background * (1 - alpha[..., None]) + foreground * alpha[..., None]
    # Uniform sensor noise (cheaper to draw than Gaussian) of standard deviation 0.017.
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(0.06)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _muted_colour(rng: np.random.Generator, *, value_range: tuple[float, float]) -> np.ndarray:
    """An RGB colour (3,) in [0, 1] of random hue, saturation up to MAX_SATURATION and HSV value
    drawn from value_range."""
    hue, saturation, value = rng.random(), rng.uniform(0, MAX_SATURATION), rng.uniform(*value_range)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32)


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> np.ndarray:
    """(2, size, size) float32 row and column index of every pixel (read-only, shared)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.flags.writeable = False
    return grid


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Antialiased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - distance, 0, 1).astype(np.float32)


def _shape_alpha(name: str, size: int, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Coverage (size, size) of one rotated shape of the given circumradius."""
    y, x = _pixel_grid(size) + 0.5
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    rho = np.hypot(u, v)
    if name == "circle":
        distance = rho - radius
    elif name == "square":
        distance = np.maximum(np.abs(u), np.abs(v)) - radius * 0.75
    elif name == "triangle":
        normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        distance = np.max([u * nx + v * ny for nx, ny in normals], axis=0) - radius * 0.5
    elif name == "star":
        phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        outline = radius * (0.4 + 0.6 * np.abs(phase - 0.5) * 2)
        distance = rho - outline
    elif name == "ring":
        distance = np.abs(rho - radius * 0.72) - radius * 0.2
    elif name == "cross":
        arm, half_width = radius * 0.95, radius * 0.28
        distance = np.minimum(
            np.maximum(np.abs(u) - arm, np.abs(v) - half_width),
            np.maximum(np.abs(u) - half_width, np.abs(v) - arm),
        )
    else:
        raise ValueError(f"synthetic dataset: unknown shape {name!r}")
    return _coverage(distance)


def _texture_alpha(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage (size, size) of a rotated periodic texture filling the image."""
    period = size * rng.uniform(0.2, 0.35)
    angle = rng.uniform(0, np.pi)
    y, x = _pixel_grid(size) + rng.uniform(0, period, size=(2, 1, 1)).astype(np.float32)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    # Distance to the nearest period centre along each axis, in pixels, in [0, period / 2].
    du = np.abs((u / period) % 1.0 - 0.5) * period
    dv = np.abs((v / period) % 1.0 - 0.5) * period
    if name == "stripes":
        return _coverage(du - period / 4)
    if name == "checkerboard":
        su = np.clip((du - period / 4), -0.5, 0.5)
        sv = np.clip((dv - period / 4), -0.5, 0.5)
        return (0.5 + 2 * su * sv).astype(np.float32)
    if name == "dots":
        return _coverage(np.hypot(du, dv) - period * 0.28)
    if name == "grid":
        line = period * 0.12
        return np.maximum(_coverage(period / 2 - du - line), _coverage(period / 2 - dv - line))
    raise ValueError(f"synthetic dataset: unknown texture {name!r}")
