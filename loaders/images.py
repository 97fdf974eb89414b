"""Image files: listing a folder or a file list, decoding any image to 8-bit RGB, checking that files decode.

Every backend lists its samples here, so the files, their order, their labels and their dataset
indices are the same whichever backend reads them (the torchvision reference loader, DALI, the
.beton conversion behind FFCV). Decoding (`load_rgb`) converts grayscale, CMYK, palette, alpha and
16-bit images to 8-bit RGB, so every backend also sees the same pixels.

Bad input is never fatal where it can be skipped: `check_images` decodes every file once (in
parallel; JPEGs at 1/8 DCT scale, which still reads the whole entropy-coded stream and so still
catches truncation) and drops, and logs once, those that do not decode. A missing or empty
dataset is a one-line DatasetError.
"""
from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Larger images are decoded at reduced scale (JPEG draft) or reduced after decoding: a 16 MP
# image already holds far more detail than any crop uses.
MAX_DECODED_PIXELS = 1 << 24
# Beyond this no image is decoded at all: a skip (set_pixel_limit: DATA.MAX_IMAGE_PIXELS, whose default is this).
# A 16-bit PNG of 30000x30000 pixels is 1.75 MB on disk and 5.8 GB decoded.
MAX_IMAGE_PIXELS = 1 << 27
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImage(Exception):
    """A file that cannot be decoded into an RGB image."""


def class_names(root: str | Path) -> list[str]:
    """The class names of an image folder (its subfolders, sorted: label i is the i-th); [] for a flat folder.
    Raises FileNotFoundError when there is no such directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def list_images(root: str | Path, *, data_limit: int) -> tuple[list[str], list[int], list[str]]:
    """Image paths, labels and class names of an image folder, sorted.

    root/<class>/**/<image> gives labels 0..C-1 by sorted class name; a flat folder of images
    gives label -1 for all. data_limit > 0 keeps the first data_limit files of the sorted list.
    Raises FileNotFoundError (no such directory) or ValueError (no image inside).
    """
    root = Path(root)
    classes = class_names(root)
    if classes:
        entries = [(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
    else:
        entries = [(str(root / e.name), -1) for e in sorted(os.scandir(root), key=lambda e: e.name) if _is_image(e)]
    if not entries:
        raise ValueError(f"image folder {root} holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
    if data_limit > 0:
        entries = entries[:data_limit]
    return [path for path, _ in entries], [label for _, label in entries], classes


def _image_files(directory: Path) -> list[str]:
    """Image files anywhere under directory, sorted. os.walk reads file types from the directory
    listing, so a 1.3M-image ImageNet folder is listed without a stat per file.

    Directory links are followed, but every real directory is listed once: a link back into a folder
    already listed (a loop such as `ln -s . again`, which would list the folder for ever) or to one
    listed through another link is skipped, and the skipped links are counted in one warning."""
    found, seen, skipped = [], set(), []
    for parent, subdirectories, names in os.walk(directory, followlinks=True):
        status = os.stat(parent)
        if (status.st_dev, status.st_ino) in seen:
            skipped.append(parent)
            subdirectories[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        found.extend(os.path.join(parent, n) for n in names if _is_image_name(n))
    if skipped:
        log.warning("skipped %d directory link(s) under %s that lead to a folder already listed (a loop or a "
                    "duplicate), first: %s", len(skipped), directory, skipped[0])
    return sorted(found)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _is_image(entry: os.DirEntry) -> bool:
    return _is_image_name(entry.name) and entry.is_file()


def set_pixel_limit(max_pixels: int) -> None:
    """DATA.MAX_IMAGE_PIXELS, for this process and the workers it forks: a file declaring more pixels is an
    UnreadableImage (a counted skip) before anything is decoded, and PIL's own decompression-bomb guard
    (a warning above the limit, an error at twice it) stays on at the same limit."""
    global MAX_IMAGE_PIXELS
    MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS = int(max_pixels)


def load_rgb(path: str) -> Image.Image:
    """Decode a file into an 8-bit RGB PIL image, or raise UnreadableImage.

    Converts grayscale, palette, CMYK, alpha (dropped) and 16-bit images (scaled to 8 bits);
    decodes images over MAX_DECODED_PIXELS at reduced scale; refuses images over MAX_IMAGE_PIXELS.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnreadableImage(f"{width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                                      "(DATA.MAX_IMAGE_PIXELS)")
            if width * height > MAX_DECODED_PIXELS and image.format == "JPEG":
                # The JPEG decoder scales by 1/2, 1/4 or 1/8 while decoding: never holds the full image.
                factor = math.sqrt(width * height / MAX_DECODED_PIXELS)
                image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
            image.load()
            rgb = _to_rgb(image)
        if rgb.width * rgb.height > MAX_DECODED_PIXELS:
            rgb = rgb.reduce(math.ceil(math.sqrt(rgb.width * rgb.height / MAX_DECODED_PIXELS)))
        return rgb
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, MemoryError) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert clips 16-bit values at 255 (a white image); scale the range instead.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


# A validation decode of a JPEG runs at 1/8 scale: it still reads the whole entropy-coded
# stream (so it still catches truncation and corruption) at a fraction of the cost.
_CHECK_JPEG_SCALE = 8


class DatasetError(ValueError):
    """A dataset that cannot be used at all (missing, empty, nothing decodable); one-line message."""


@dataclass(frozen=True)
class ImageList:
    """The samples of an image folder or a file list.

    paths: file of each sample. labels: (N,) int64 class index (-1 without classes).
    indices: (N,) int64 dataset index: the position in the full listing, before any file was
    skipped, so it matches the reference loader's index of the same file.
    """

    paths: list[str]
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and int(self.labels.min()) >= 0

    def subset(self, keep: np.ndarray) -> "ImageList":
        """The samples where the boolean mask `keep` (N,) is true."""
        return ImageList([p for p, k in zip(self.paths, keep) if k], self.labels[keep], self.indices[keep])


def list_samples(data_path: str | os.PathLike, *, data_limit: int) -> ImageList:
    """List an image folder (list_images: the files, order and labels every backend uses) or a
    file list ("relative/path label" per line). data_limit > 0 keeps the first ones.

    Raises DatasetError (one line) for a missing or empty dataset.
    """
    path = Path(data_path).expanduser()
    if path.is_file():
        paths, labels = _read_file_list(path)
        if data_limit > 0:
            paths, labels = paths[:data_limit], labels[:data_limit]
    else:
        try:
            paths, labels, _ = list_images(path, data_limit=data_limit)
        except (FileNotFoundError, ValueError) as error:
            raise DatasetError(str(error)) from None
    if not paths:
        raise DatasetError(f"no samples in {path}")
    return ImageList(paths, np.asarray(labels, np.int64), np.arange(len(paths), dtype=np.int64))


def _read_file_list(list_file: Path) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{list_file}:{number}: expected '<path> <label>', got {line!r}")
        paths.append(str(list_file.parent / parts[0]))
        labels.append(int(parts[1]))
    return paths, labels


def why_unreadable(path: str, formats: frozenset[str] | None = None) -> str | None:
    """None when `path` decodes (in one of `formats`, PIL's names; None: any), else why not."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return (f"{image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                        "(DATA.MAX_IMAGE_PIXELS)")
            if formats is not None and image.format not in formats:
                return f"format {image.format} is not one of {sorted(formats)}"
            if image.format == "JPEG":
                image.draft("RGB", (image.width // _CHECK_JPEG_SCALE, image.height // _CHECK_JPEG_SCALE))
                image.load()
                return None
        load_rgb(path)  # other formats: the reference loader's own decode and size policy
        return None
    except Exception as error:  # noqa: BLE001 - any failure to decode (UnreadableImage, OSError, ...): skip
        message = str(error).splitlines()[0] if str(error) else ""
        return f"{type(error).__name__}: {message}"[:200]


def _check_worker_init() -> None:
    # A forked worker inherits fastssl-train's SIGTERM / SIGUSR1 handler (dist.StopOnSignal), which only
    # records the signal: Pool.terminate's SIGTERM would then leave a worker blocked on the task queue's lock
    # and the pool's join hanging for ever (seen in the fault harness). Workers die on it, as by default.
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)


def check_images(
    images: ImageList, *, num_workers: int, progress: bool, formats: frozenset[str] | None = None
) -> ImageList:
    """Decode-check every file in parallel; return the decodable ones and log the skipped once.

    formats: accepted PIL format names (e.g. what DALI decodes); None accepts any PIL reads.
    Raises DatasetError when nothing is decodable.
    """
    check = functools.partial(why_unreadable, formats=formats)
    with multiprocessing.get_context("fork").Pool(max(1, num_workers), initializer=_check_worker_init) as pool:
        reasons = pool.imap(check, images.paths, chunksize=64)
        if progress:
            from tqdm import tqdm

            reasons = tqdm(reasons, total=len(images), desc="checking images", unit="img")
        reasons = list(reasons)
        pool.close()  # the workers take their end-of-work marker and exit; terminate() is left for errors
        pool.join()
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    skipped = [f"{path} ({reason})" for path, reason in zip(images.paths, reasons) if reason is not None]
    if skipped:
        log.warning(
            "skipped %d of %d files that cannot be decoded:\n  %s", len(skipped), len(images), "\n  ".join(skipped)
        )
    if not keep.any():
        raise DatasetError(f"none of the {len(images)} files could be decoded (first: {skipped[0]})")
    return images.subset(keep)
