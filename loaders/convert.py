"""`fastssl-convert`: an image folder (or the built-in synthetic dataset) -> an FFCV .beton.

    fastssl-convert /data/imagenet/train /data/imagenet_train.beton --max-resolution 512 \
        --write-mode proportion --jpeg-quality 90 --compress-probability 0.5 --num-workers 16 --verify
    fastssl-convert --synthetic /tmp/synthetic_train.beton

What the .beton holds and how it is written: loaders.beton. Bad input is never fatal: a first
pass (parallel, with a progress bar) decodes every file; corrupt, truncated, zero-byte and
non-image files and oversized images are skipped and listed once in the log. A missing or empty
folder is a one-line error (exit code 2).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from loaders.beton import convert_image_folder, verify_beton
from loaders.images import MAX_IMAGE_PIXELS, DatasetError, set_pixel_limit
from loaders.sources import resolve_image_folder


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
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="skip image files declaring more pixels (DATA.MAX_IMAGE_PIXELS)")
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
    set_pixel_limit(args.max_image_pixels)
    if args.synthetic:
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
