"""The .beton format of fastssl: writing an image folder to it, reading its table and images back.

A fastssl .beton holds three fields: `image` (RGBImageField), `label` (the ImageFolder class
index) and `index` (the sample's dataset index: its position in the full, sorted listing of
loaders.images.list_samples; it stays correct when unreadable files are skipped, so NPID's
memory bank lines up with the other backends).

Writing checks every file first (loaders.images.check_images: bad files are skipped and listed
once) and decodes with the reference loader's decoder (loaders.images.load_rgb), so every
backend sees the same pixels; the output is written to a temporary name and renamed into place
only when complete. Reading decodes each image once at its stored size (`PaddedRGBDecoder`).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from loaders.images import DatasetError, ImageList, check_images, list_samples, load_rgb

try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, memcpy
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter
except ImportError:  # the format is optional: require_ffcv says how to install it
    SimpleRGBImageDecoder = object
    FFCV_IMPORT_ERROR = "the FFCV backend needs `pip install fastssl[ffcv]` (ffcv==1.0.2, numba, opencv)"
else:
    FFCV_IMPORT_ERROR = None

log = logging.getLogger(__name__)


def require_ffcv() -> None:
    """Raise ImportError, saying how to install it, where ffcv is missing."""
    if FFCV_IMPORT_ERROR is not None:
        raise ImportError(FFCV_IMPORT_ERROR)


class PaddedRGBDecoder(SimpleRGBImageDecoder):
    """Decode each RGBImageField record once, at its stored size, into a padded buffer.

    Output per batch: (B, max_height, max_width, 3) uint8, image i in [:h_i, :w_i]; the row
    below and the column right of it repeat its last row/column, so bilinear sampling at the
    crop border never reads a neighbour's stale pixels. (A subclass of FFCV's decoder for
    RGBImageField because FFCV recognises a pipeline's decoder by that type.)
    """

    def declare_state_and_memory(self, previous_state):
        self.max_height = int(self.metadata["height"].max())
        self.max_width = int(self.metadata["width"].max())
        shape = (self.max_height, self.max_width, 3)
        scratch = (self.max_height * self.max_width * 3,)
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
            (AllocationQuery(shape, np.dtype("<u1")), AllocationQuery(scratch, np.dtype("<u1"))),
        )

    def generate_code(self):
        memory_read = self.memory_read
        imdecode_compiled = Compiler.compile(imdecode)
        memcpy_compiled = Compiler.compile(memcpy)
        sample_range = Compiler.get_iterator()
        jpeg_mode = IMAGE_MODES["jpg"]

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            for row in sample_range(len(batch_indices)):
                field = metadata[batch_indices[row]]
                data = memory_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                flat = scratch[row][: 3 * height * width]
                if field["mode"] == jpeg_mode:
                    imdecode_compiled(data, flat, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    memcpy_compiled(data, flat)
                image = flat.reshape(height, width, 3)
                out = destination[row]
                out[:height, :width] = image
                if height < out.shape[0]:
                    out[height, :width] = image[height - 1]
                if width < out.shape[1]:
                    out[: min(height + 1, out.shape[0]), width] = out[: min(height + 1, out.shape[0]), width - 1]
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


@dataclass(frozen=True)
class BetonTable:
    """Per-record metadata of a fastssl .beton, read without decoding: (N,) int64 each."""

    labels: np.ndarray
    indices: np.ndarray
    heights: np.ndarray
    widths: np.ndarray


def read_beton_table(path: str | os.PathLike) -> BetonTable:
    """The label, dataset index and stored size of every record of `path`."""
    require_ffcv()
    reader = Reader(str(path))
    missing = {"image", "label", "index"} - set(reader.field_names)
    if missing:
        raise ValueError(f"{path}: fields {sorted(missing)} missing; write it with fastssl-convert")
    column = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
    image = reader.metadata[column["image"]]
    return BetonTable(
        labels=reader.metadata[column["label"]].astype(np.int64),
        indices=reader.metadata[column["index"]].astype(np.int64),
        heights=image["height"].astype(np.int64),
        widths=image["width"].astype(np.int64),
    )


def decode_all_images(path: str | os.PathLike, *, num_workers: int) -> int:
    """Decode every image of `path` in order; return how many decoded (a full read-back check)."""
    require_ffcv()
    loader = Loader(
        str(path), batch_size=64, num_workers=num_workers, order=OrderOption.SEQUENTIAL, drop_last=False,
        pipelines={"image": [PaddedRGBDecoder(), ToTensor()], "label": None, "index": None},
    )
    return sum(images.shape[0] for (images,) in loader)


def read_rgb(path: str, *, max_resolution: int | None) -> np.ndarray:
    """Decode one image (loaders.images.load_rgb: any mode to 8-bit RGB) to (H, W, 3) uint8,
    the longer side reduced to at most max_resolution (None: as decoded)."""
    image = load_rgb(path)
    if max_resolution is not None and max(image.size) > max_resolution:
        scale = max_resolution / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BOX)
    return np.asarray(image)


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
    require_ffcv()
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
    table = read_beton_table(path)
    if len(table.labels) != len(expected):
        raise DatasetError(f"verify: {path} has {len(table.labels)} samples, expected {len(expected)}")
    if not np.array_equal(table.labels, expected.labels) or not np.array_equal(table.indices, expected.indices):
        raise DatasetError(f"verify: labels or indices of {path} differ from the source listing")
    decoded = decode_all_images(path, num_workers=num_workers)
    if decoded != len(expected):
        raise DatasetError(f"verify: decoded {decoded} images of {path}, expected {len(expected)}")
    log.info("verified %s: %d samples, labels and indices match", path, decoded)
