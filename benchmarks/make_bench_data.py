"""Benchmark images from the photographs scikit-image ships: ImageNet-like JPEGs, deterministic.

Each shipped photograph is one pseudo-class; its images are random crops (30-100% of the
area, landscape or portrait 4:3) resized to 500x375 or 375x500 (ImageNet's typical size),
randomly flipped and slightly re-exposed, saved as JPEG quality 90 in an ImageFolder layout:
<root>/<photo>/<00000>.jpg. So decoding cost, file sizes and content statistics are those of
real photographs, with no download.

    python -m benchmarks.make_bench_data /tmp/bench-data --num-images 2000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# Photographs among skimage/data (grayscale ones are converted to RGB; charts, text and
# binary images are left out).
PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)
MANIFEST_NAME = "fastssl-bench-data.json"
_VERSION = 1


def photo_directory() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def ensure_bench_data(root: str | os.PathLike | None, *, num_images: int, long_side: int = 500, seed: int = 0) -> Path:
    """The benchmark image folder at root (None: $FASTSSL_CACHE/bench-<n>), made once."""
    params = {"version": _VERSION, "num_images": num_images, "long_side": long_side, "seed": seed}
    if root is None:
        cache = Path(os.environ.get("FASTSSL_CACHE") or Path.home() / ".cache" / "fastssl")
        root = cache / f"bench-{num_images}x{long_side}-seed{seed}-v{_VERSION}"
    root = Path(root)
    try:
        if json.loads((root / MANIFEST_NAME).read_text()) == params:
            return root
    except (OSError, ValueError):
        pass
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"make_bench_data: {root} is a non-empty directory without a matching {MANIFEST_NAME}")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_images(staging, num_images=num_images, long_side=long_side, seed=seed)
        (staging / MANIFEST_NAME).write_text(json.dumps(params))
        if root.exists():
            root.rmdir()
        os.rename(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_images(root: Path, *, num_images: int, long_side: int, seed: int) -> None:
    photos = [Image.open(photo_directory() / name).convert("RGB") for name in PHOTOS]
    short_side = long_side * 3 // 4
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        label = i % len(photos)
        photo = photos[label]
        portrait = rng.random() < 0.25
        aspect = 3 / 4 if portrait else 4 / 3  # width / height
        area = photo.width * photo.height * rng.uniform(0.3, 1.0)
        width = min(photo.width, round(np.sqrt(area * aspect)))
        height = min(photo.height, round(width / aspect))
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        size = (short_side, long_side) if portrait else (long_side, short_side)
        image = photo.resize(size, Image.BICUBIC, box=(left, top, left + width, top + height))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = image.point(lambda v, gain=rng.uniform(0.8, 1.2): min(255, int(v * gain)))
        directory = root / Path(PHOTOS[label]).stem
        directory.mkdir(exist_ok=True)
        image.save(directory / f"{i:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", help="output folder (default: the cache)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--long-side", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(ensure_bench_data(args.root, num_images=args.num_images, long_side=args.long_side, seed=args.seed))


if __name__ == "__main__":
    main()
