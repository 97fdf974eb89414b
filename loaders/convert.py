"""`fastssl-convert`: an image folder (or the built-in synthetic dataset) -> an FFCV .beton.

    fastssl-convert /data/imagenet/train /data/imagenet_train.beton --max-resolution 512 \
        --write-mode proportion --jpeg-quality 90 --compress-probability 0.5 --num-workers 16 --verify
    fastssl-convert --synthetic /tmp/synthetic_train.beton

The .beton holds three fields: `image` (RGBImageField), `label` (the ImageFolder class index)
and `index` (the sample's position in the full, sorted folder listing, i.e. its dataset index;
it stays correct when unreadable files are skipped, so NPID's memory bank lines up with the
other backends).

Bad input is never fatal. A first pass (parallel, with a progress bar) decodes every file with
PIL (JPEGs at 1/8 DCT scale, which still reads the whole entropy-coded stream and so still
catches truncation); corrupt, truncated, zero-byte and non-image files and oversized images
are skipped and listed once in the log. Grayscale, CMYK, palette, alpha and 16-bit images are
converted to 8-bit RGB by the reference loader's decoder (loaders.folder.load_rgb), so every
backend sees the same pixels. The output is written to a temporary name and renamed
into place only when complete. A missing or empty folder is a one-line error (exit code 2).
"""
from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loaders.folder import list_images, load_rgb

log = logging.getLogger(__name__)

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
    """List an image folder (loaders.folder.list_images: the reference loader's files, order and
    labels) or a file list ("relative/path label" per line). data_limit > 0 keeps the first ones.

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


def read_rgb(path: str, *, max_resolution: int | None) -> np.ndarray:
    """Decode one image (loaders.folder.load_rgb: any mode to 8-bit RGB) to (H, W, 3) uint8,
    the longer side reduced to at most max_resolution (None: as decoded)."""
    image = load_rgb(path)
    if max_resolution is not None and max(image.size) > max_resolution:
        scale = max_resolution / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BOX)
    return np.asarray(image)


def _check_one(path: str, formats: frozenset[str] | None) -> str | None:
    """None when `path` decodes (in one of `formats`, PIL's names; None: any), else why not."""
    try:
        with Image.open(path) as image:
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


def _lift_pixel_limit() -> None:
    # Pool initializer: load_rgb applies its own size policy; PIL's bomb check would refuse
    # large JPEGs that the draft decode reads cheaply. Only this worker process is affected.
    Image.MAX_IMAGE_PIXELS = None


def check_images(
    images: ImageList, *, num_workers: int, progress: bool, formats: frozenset[str] | None = None
) -> ImageList:
    """Decode-check every file in parallel; return the decodable ones and log the skipped once.

    formats: accepted PIL format names (e.g. what DALI decodes); None accepts any PIL reads.
    Raises DatasetError when nothing is decodable.
    """
    check = functools.partial(_check_one, formats=formats)
    with multiprocessing.get_context("fork").Pool(max(1, num_workers), initializer=_lift_pixel_limit) as pool:
        reasons = pool.imap(check, images.paths, chunksize=64)
        if progress:
            from tqdm import tqdm

            reasons = tqdm(reasons, total=len(images), desc="checking images", unit="img")
        reasons = list(reasons)
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    skipped = [f"{path} ({reason})" for path, reason in zip(images.paths, reasons) if reason is not None]
    if skipped:
        log.warning(
            "skipped %d of %d files that cannot be decoded:\n  %s", len(skipped), len(images), "\n  ".join(skipped)
        )
    if not keep.any():
        raise DatasetError(f"none of the {len(images)} files could be decoded (first: {skipped[0]})")
    return images.subset(keep)


class _FolderSamples:
    """The indexable dataset FFCV's writer reads: (image (H, W, 3) uint8, label, index).

    A file that fails here although it passed check_images (it changed in between) yields a
    1x1 placeholder and is counted in `failures`; FFCV's writer would hang on an exception.
    """

    def __init__(self, images: ImageList, *, max_resolution: int | None):
        self.images = images
        self.max_resolution = max_resolution
        self.failures = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            pixels = read_rgb(self.images.paths[i], max_resolution=self.max_resolution)
        except Exception:  # noqa: BLE001 - see the class docstring
            with self.failures.get_lock():
                self.failures.value += 1
            pixels = np.zeros((1, 1, 3), np.uint8)
        return pixels, int(self.images.labels[i]), int(self.images.indices[i])


def convert_image_folder(
    data_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    max_resolution: int | None,
    write_mode: str,
    jpeg_quality: int,
    compress_probability: float,
    num_workers: int,
    progress: bool,
) -> ImageList:
    """Write every decodable image of `data_path` to the .beton `output`; return what was written."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = check_images(list_samples(data_path, data_limit=-1), num_workers=num_workers, progress=progress)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    samples = _FolderSamples(images, max_resolution=max_resolution)
    fields = {
        "image": RGBImageField(
            write_mode=write_mode, max_resolution=max_resolution,
            jpeg_quality=jpeg_quality, compress_probability=compress_probability,
        ),
        "label": IntField(),
        "index": IntField(),
    }
    try:
        writer = DatasetWriter(str(temporary), fields, num_workers=max(1, num_workers))
        if not progress:
            # ffcv's writer always draws a tqdm bar; silence it where no progress was asked for.
            import ffcv.writer

            ffcv.writer.tqdm = lambda *args, **kwargs: _NoProgress()
        writer.from_indexed_dataset(samples, chunksize=32)
        if samples.failures.value:
            raise DatasetError(f"{samples.failures.value} images failed to decode while writing; {output} not written")
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    log.info("wrote %d images to %s", len(images), output)
    return images


class _NoProgress:
    def update(self, _count: int) -> None:
        pass

    def close(self) -> None:
        pass


def verify_beton(path: str | os.PathLike, expected: ImageList, *, num_workers: int) -> None:
    """Read every sample of `path` back (decoding each image) and compare counts, labels and indices.

    Raises DatasetError on the first mismatch.
    """
    from loaders.ffcv import read_beton_table, decode_all_images

    table = read_beton_table(path)
    if len(table.labels) != len(expected):
        raise DatasetError(f"verify: {path} has {len(table.labels)} samples, expected {len(expected)}")
    if not np.array_equal(table.labels, expected.labels) or not np.array_equal(table.indices, expected.indices):
        raise DatasetError(f"verify: labels or indices of {path} differ from the source listing")
    decoded = decode_all_images(path, num_workers=num_workers)
    if decoded != len(expected):
        raise DatasetError(f"verify: decoded {decoded} images of {path}, expected {len(expected)}")
    log.info("verified %s: %d samples, labels and indices match", path, decoded)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastssl-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_path", nargs="?", help="ImageFolder root or file list (omit with --synthetic)")
    parser.add_argument("output", help="the .beton to write")
    parser.add_argument("--synthetic", action="store_true", help="convert the built-in synthetic dataset")
    parser.add_argument("--split", default="train", choices=("train", "val"), help="synthetic split")
    # The defaults are DATA.TRAIN.SYNTHETIC's, so the trainer's cached copy is reused.
    parser.add_argument("--synthetic-image-size", type=int, default=64)
    parser.add_argument("--synthetic-train-per-class", type=int, default=300)
    parser.add_argument("--synthetic-val-per-class", type=int, default=50)
    parser.add_argument("--max-resolution", type=int, default=512, help="longer side cap (0: as stored)")
    parser.add_argument("--write-mode", default="proportion", choices=("jpg", "raw", "proportion"))
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--compress-probability", type=float, default=0.5, help="JPEG share for proportion")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--verify", action="store_true", help="read every sample back and compare")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.synthetic == (args.data_path is not None):
        parser.error("give either DATA_PATH or --synthetic")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or raises SystemExit(2) after one line on a bad dataset."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_path = args.data_path
    if args.synthetic:
        from loaders.build import resolve_image_folder

        data_path = resolve_image_folder(source="synthetic", data_path=None, split=args.split, synthetic_params={
            "image_size": args.synthetic_image_size, "train_per_class": args.synthetic_train_per_class,
            "val_per_class": args.synthetic_val_per_class,
        })
    try:
        written = convert_image_folder(
            data_path, args.output, max_resolution=args.max_resolution or None, write_mode=args.write_mode,
            jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
            num_workers=args.num_workers, progress=not args.no_progress,
        )
        if args.verify:
            verify_beton(args.output, written, num_workers=args.num_workers)
    except DatasetError as error:
        print(f"fastssl-convert: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
