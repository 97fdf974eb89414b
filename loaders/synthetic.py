"""The built-in dataset: procedurally drawn shapes and textures, generated on first use.

Ten classes whose identity is carried by shape or texture only: every image draws its
foreground and background colours, position, scale, rotation and background style at random,
independently of its class. So a model that learns colour-invariant features (what SSL's
colour distortion asks for) separates the classes, while a random network, whose features
are dominated by colour, does not. Textures fill the whole image and shapes come as one to
three instances, so even a small local crop shows class evidence (an edge, a corner, a
period).

Layout (ImageFolder): <root>/train/<class>/00000.jpg and <root>/val/<class>/00000.jpg, plus a
manifest recording the generation parameters. Generation writes to a temporary sibling
directory and renames it into place, so a killed run never leaves half a dataset behind.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "circle", "square", "triangle", "star", "ring", "cross",
    "stripes", "checkerboard", "dots", "grid",
)
_TEXTURES = {"stripes", "checkerboard", "dots", "grid"}
# Bump when the drawing changes, so caches made by an older generator are not reused.
_GENERATOR_VERSION = 1
MANIFEST_NAME = "fastssl-synthetic.json"
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

    root: where to keep it; None: $FASTSSL_CACHE (or ~/.cache/fastssl)/synthetic-<params>.
    An existing directory with a matching manifest is reused; one with another manifest is
    regenerated; a non-empty directory without a manifest is refused (ValueError), so user
    data is never overwritten.
    """
    params = {
        "version": _GENERATOR_VERSION, "image_size": int(image_size), "seed": int(seed),
        "train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
        "classes": list(CLASS_NAMES),
    }
    if root is None:
        cache = Path(os.environ.get("FASTSSL_CACHE") or Path.home() / ".cache" / "fastssl")
        root = cache / (
            f"synthetic-{image_size}px-{train_per_class}x{val_per_class}-seed{seed}-v{_GENERATOR_VERSION}"
        )
    root = Path(root).expanduser()
    if _read_manifest(root) == params:
        return root
    if root.exists() and any(root.iterdir()) and _read_manifest(root) is None:
        raise ValueError(f"synthetic dataset: {root} is a non-empty directory without {MANIFEST_NAME}")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            _write_split(staging / split, split=split, per_class=per_class, image_size=image_size, seed=seed)
        (staging / MANIFEST_NAME).write_text(json.dumps(params, indent=1))
        _move_into_place(staging, root, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("synthetic dataset ready at %s", root)
    return root


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(staging: Path, root: Path, params: dict) -> None:
    """Rename staging to root; tolerate another process (another rank) having won the race."""
    if root.exists():
        # An outdated dataset (checked by the caller) or an empty directory: move it aside first.
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
    # Drawing costs ~1 ms an image: worth a few processes for datasets of thousands.
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, jobs))


def _write_class(job: tuple[Path, str, int, int, int, int]) -> None:
    class_dir, split, label, per_class, image_size, seed = job
    class_dir.mkdir(parents=True)
    for i in range(per_class):
        # One stream per image: the dataset does not depend on the order of generation.
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], label, i])
        pixels = draw_image(CLASS_NAMES[label], size=image_size, rng=rng)
        Image.fromarray(pixels).save(class_dir / f"{i:05d}.jpg", quality=90)


def draw_image(name: str, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `name`, all nuisance factors drawn from rng."""
    background = _background(size, rng)
    foreground_colour = _contrasting_colour(background[::4, ::4].reshape(-1, 3).mean(0), rng)
    if name in _TEXTURES:
        alpha = _texture_alpha(name, size, rng)
    else:
        alpha = np.zeros((size, size), np.float32)
        count = int(rng.integers(1, 4))
        for _ in range(count):
            radius = size * (rng.uniform(0.25, 0.42) if count == 1 else rng.uniform(0.13, 0.24))
            centre = rng.uniform(0.55 * radius, size - 0.55 * radius, size=2)
            alpha = np.maximum(alpha, _shape_alpha(name, size, centre, radius, rng.uniform(0, 2 * np.pi)))
    shade = foreground_colour * rng.uniform(0.85, 1.15, size=(1, 1, 1)).astype(np.float32)
    image = background * (1 - alpha[..., None]) + shade * alpha[..., None]
    # Uniform sensor noise (cheaper to draw than Gaussian), standard deviation up to 0.04.
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(rng.uniform(0.0, 0.14))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float background in [0, 1]: a linear gradient or smooth colour noise."""
    if rng.random() < 0.5:
        start, end = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        y, x = _pixel_grid(size) / size
        t = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)[..., None]
        return start * (1 - t) + end * t
    base = rng.random(3).astype(np.float32)
    cells = int(rng.integers(2, 6))
    coarse = rng.normal(0, rng.uniform(0.05, 0.2), size=(cells, cells, 3)).astype(np.float32)
    upsampled = np.asarray(
        Image.fromarray(((coarse + 1) * 127.5).clip(0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
        np.float32,
    ) / 127.5 - 1
    return np.clip(base + upsampled, 0, 1)


def _contrasting_colour(background_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour whose luminance differs from the background's, so the shape stays visible."""
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    colour = rng.random(3).astype(np.float32)
    for _ in range(20):
        if abs(float((colour - background_mean) @ luma)) > 0.25:
            break
        colour = rng.random(3).astype(np.float32)
    else:
        colour = np.full(3, 1.0 if background_mean @ luma < 0.5 else 0.0, np.float32)
    return colour


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
    period = size * rng.uniform(0.12, 0.25)
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
