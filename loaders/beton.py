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

from loaders.images import MAX_DECODED_PIXELS, DatasetError, ImageList, check_images, list_samples, load_rgb

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


class BetonError(DatasetError):
    """A .beton that fastssl will not read; the message names the file and what is wrong, in one line."""


# The fields of a fastssl .beton, in the order convert_image_folder writes them, with FFCV's type ids.
_FIELDS = (("image", 2), ("label", 1), ("index", 1))
_JPEG_MODE, _RAW_MODE = 0, 1


def read_beton_table(path: str | os.PathLike) -> BetonTable:
    """The label, dataset index and stored size of every record of `path`, after checking the whole file.

    Every structure of the file is checked against the file's size before it is read, and every record
    against the table that locates it, so neither this function nor FFCV's reader and decoders (which
    trust the file: a raw record is copied with no size check) ever allocate or copy on the file's word:
    the header (version, page size, sample count), the field descriptors (exactly image, label, index),
    the per-record metadata, the allocation table (one region per record, inside the data pages), each
    record's mode and dimensions (at most loaders.images.MAX_DECODED_PIXELS, what fastssl-convert writes)
    and a raw record's size (height * width * 3), labels (>= -1) and dataset indices (increasing, >= 0).
    Raises BetonError naming the file and the first problem.
    """
    require_ffcv()
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

    path = Path(path)

    def fail(problem: str) -> BetonError:
        return BetonError(f"{path}: {problem}")

    try:
        file_size = path.stat().st_size
    except OSError as error:
        raise fail(f"cannot read it ({error.strerror or error})") from None
    if file_size < HeaderType.itemsize:
        raise fail(f"not a .beton: {file_size} bytes, shorter than its {HeaderType.itemsize}-byte header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise fail(f"not an FFCV .beton of format version {CURRENT_VERSION} (its header says {header['version']})")
    if header["num_fields"] != len(_FIELDS):
        raise fail(f"holds {header['num_fields']} fields; a fastssl .beton has image, label and index: "
                   "write it with fastssl-convert")
    page_size = int(header["page_size"])
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size < MAX_PAGE_SIZE:
        raise fail(f"page size {page_size} is not a power of 2 in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE})")
    descriptors_end = HeaderType.itemsize + len(_FIELDS) * FieldDescType.itemsize
    if file_size < descriptors_end:
        raise fail(f"truncated: {file_size} bytes end inside the field descriptors ({descriptors_end} bytes)")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=len(_FIELDS), offset=HeaderType.itemsize)
    found = tuple((bytes(d["name"]).split(b"\0")[0].decode("latin-1"), int(d["type_id"])) for d in descriptors)
    if found != _FIELDS:
        raise fail(f"fields {[name for name, _ in found]} (type ids {[kind for _, kind in found]}) are not "
                   "image, label, index (2, 1, 1): write it with fastssl-convert")

    metadata_type = np.dtype([("", RGBImageField().metadata_type), ("", "<i8"), ("", "<i8")], align=True)
    num_samples, table_at = int(header["num_samples"]), int(header["alloc_table_ptr"])
    metadata_end = descriptors_end + num_samples * metadata_type.itemsize
    if num_samples == 0:
        raise fail("holds no samples")
    if metadata_end > file_size:
        raise fail(f"its header claims {num_samples} samples, whose metadata alone needs {metadata_end} bytes; "
                   f"the file has {file_size}")
    if not metadata_end <= table_at <= file_size or (file_size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise fail(f"its allocation table (at byte {table_at}) is not a whole table between the metadata "
                   f"(ends at byte {metadata_end}) and the end of the file ({file_size} bytes)")
    num_regions = (file_size - table_at) // ALLOC_TABLE_TYPE.itemsize
    if num_regions != num_samples:
        raise fail(f"its allocation table locates {num_regions} records for {num_samples} samples")

    metadata = np.fromfile(path, dtype=metadata_type, count=num_samples, offset=descriptors_end)
    image, labels, indices = metadata["f0"], metadata["f1"].astype(np.int64), metadata["f2"].astype(np.int64)
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, count=num_regions, offset=table_at)
    region = np.argsort(table["sample_id"], kind="stable")
    if not np.array_equal(table["sample_id"][region], np.arange(num_samples, dtype=np.uint64)):
        raise fail("its allocation table does not locate exactly one record per sample")
    pointers, sizes = table["ptr"][region].astype(np.int64), table["size"][region].astype(np.int64)
    heights, widths = image["height"].astype(np.int64), image["width"].astype(np.int64)
    expected_raw_sizes = heights * widths * 3
    data_start = -(-metadata_end // page_size) * page_size  # FFCV's first page after the metadata
    problems = (
        (~np.isin(image["mode"], (_JPEG_MODE, _RAW_MODE)), "image mode is neither JPEG (0) nor raw (1)"),
        ((heights < 1) | (widths < 1), "image has no pixels"),
        (heights * widths > MAX_DECODED_PIXELS, f"image exceeds {MAX_DECODED_PIXELS} pixels"),
        (image["data_ptr"].astype(np.int64) != pointers, "image pointer is not the record's allocation"),
        ((pointers < data_start) | (sizes < 1) | (pointers + sizes > table_at), "record lies outside the data pages"),
        ((image["mode"] == _RAW_MODE) & (sizes != expected_raw_sizes), "raw record's size is not height*width*3"),
        (labels < -1, "label is below -1"),
        (indices < 0, "dataset index is negative"),
    )
    for bad, problem in problems:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise fail(f"sample {i}: {problem} (mode {image['mode'][i]}, {heights[i]}x{widths[i]} pixels, "
                       f"record of {sizes[i]} bytes at {pointers[i]}; {int(bad.sum())} sample(s) like it)")
    if np.any(np.diff(indices) <= 0):
        raise fail("its dataset indices are not increasing")
    return BetonTable(labels=labels, indices=indices, heights=heights, widths=widths)


def decode_all_images(path: str | os.PathLike, *, num_workers: int) -> int:
    """Decode every image of `path` in order; return how many decoded (a full read-back check)."""
    read_beton_table(path)  # checks the whole file first: FFCV's decoders trust it
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
