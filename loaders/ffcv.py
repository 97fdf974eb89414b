"""The FFCV backend: a .beton (written by `fastssl-convert`) -> multi-crop Batches.

Decode once, crop many: `loaders.beton.PaddedRGBDecoder` decodes every image ONCE at its
stored size (libjpeg-turbo for JPEG records, a copy for raw ones) into the top left of a fixed
(max_height, max_width, 3) buffer, in FFCV's numba-compiled, multi-threaded pipeline. The
batch then goes to the training device (ToDevice, only where the device is CUDA) and all the
crops are cut from it at once by loaders.augment.DeviceMultiCrop, so a sample costs one
decode, not one per crop, and the augmentation is the same code as every other backend's.
On the CPU the two overlap: FFCV decodes the next batches (batches_ahead) in its own threads
while DeviceMultiCrop spreads the current batch's crops over torch.get_num_threads() threads.

Order: 'random' is the reference loader's order (loaders.sampler.EpochBatchSampler: one
permutation per epoch from (seed, epoch), dealt out round-robin over the ranks), so with the
same seed every backend visits the samples in the same order. No torch.distributed is needed:
FFCV 1.0.2's own distributed=True builds torch's DistributedSampler without num_replicas/rank,
which needs an initialised process group. 'quasi_random' is FFCV's page-local order
(reads far less at random from disk when os_cache=False); FFCV 1.0.2 supports it on one
rank only. os_cache=True memory-maps the file and leaves caching to the OS page cache (best
when the dataset fits in RAM); False reads pages itself.

A backend-specific argument's default lives in build_ffcv_loader's signature: order='random',
os_cache=True, batches_ahead=3 (batches FFCV prepares ahead; each holds a padded buffer of
batch_size * max_height * max_width * 3 bytes, so keep max_resolution moderate).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from loaders.augment import DeviceMultiCrop
from loaders.batch import Batch
from loaders.beton import BetonError, PaddedRGBDecoder, convert_image_folder, read_beton_table, require_ffcv
from loaders.cache import cache_dir
from loaders.images import ImageList, list_samples, why_unreadable
from loaders.recipe import MultiCropRecipe
from loaders.sampler import EpochBatchSampler
from loaders.sources import resolve_image_folder

log = logging.getLogger(__name__)

class _EpochTraversal:
    """Stands in for FFCV's TraversalOrder: this rank's order of an epoch, from `start_batch` on."""

    def __init__(self, order_of_epoch, *, batch_size: int):
        self.order_of_epoch = order_of_epoch
        self.batch_size = batch_size
        self.start_batch = 0

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order_of_epoch(epoch)[self.start_batch * self.batch_size :]


class FFCVTrainLoader:
    """Iterates Batches of one rank; set_epoch(epoch, start_batch) before each epoch."""

    def __init__(self, *, loader, traversal: _EpochTraversal, multicrop: DeviceMultiCrop, record_indices: torch.Tensor,
                 sizes: torch.Tensor, num_samples: int, num_batches: int, has_labels: bool, seed: int, rank: int, device: torch.device,
                 channels_last: bool):
        self.loader = loader
        self.traversal = traversal
        self.multicrop = multicrop
        # The stored (height, width) of each record, (N, 2) int64, and its dataset index, (N,) increasing (checked
        # by read_beton_table): a batch's sizes are found by binary search, so no table is sized by the indices.
        self.record_indices, self.sizes = record_indices, sizes
        self.num_samples = num_samples
        self.num_batches = num_batches
        self.has_labels = has_labels
        self.seed, self.rank, self.device = seed, rank, device
        self.channels_last = channels_last
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.loader.next_epoch = epoch
        self.traversal.start_batch = start_batch

    def __iter__(self):
        generator = torch.Generator(device=self.device)
        for batch_number, (images, labels, indices) in enumerate(self.loader, start=self.traversal.start_batch):
            # One seed per (seed, rank, epoch, batch): a resumed epoch draws the same crops.
            generator.manual_seed(_mix_seed(self.seed, self.rank, self.epoch, batch_number))
            # FFCV reuses its batch buffers: keep copies of what outlives this step.
            indices, labels = indices.view(-1).clone(), labels.view(-1).clone()
            sizes = self.sizes[torch.searchsorted(self.record_indices, indices)]
            crops = self.multicrop(images.permute(0, 3, 1, 2), sizes, generator=generator)
            if not self.channels_last:
                crops = [crop.contiguous() for crop in crops]
            yield Batch(crops=crops, indices=indices, labels=labels if self.has_labels else None)
        self.epoch += 1
        self.loader.next_epoch = self.epoch
        self.traversal.start_batch = 0


def build_ffcv_loader(
    *, source: str, data_path: str | None, backend: str, recipe: MultiCropRecipe, batch_size: int, num_workers: int,
    drop_last: bool, data_limit: int, seed: int, rank: int, world_size: int, device: torch.device | str,
    dtype: torch.dtype, channels_last: bool = True, synthetic_params: dict | None = None,
    order: str = "random", os_cache: bool = True, batches_ahead: int = 3, max_resolution: int = 512,
) -> FFCVTrainLoader:
    """The FFCV training loader of one rank.

    source 'ffcv': data_path is a .beton from fastssl-convert. 'disk_folder' / 'synthetic': the
    folder is converted once (max_resolution, JPEG quality 90, proportion 0.5) to a cached
    .beton under $FASTSSL_CACHE/ffcv, keyed by a digest of the folder's contents (see _beton_for).
    """
    require_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToDevice, ToTensor

    if order not in ("random", "quasi_random"):
        raise ValueError(f"ffcv order {order!r}: use 'random' or 'quasi_random'")
    if order == "quasi_random" and (world_size > 1 or os_cache):
        raise ValueError("ffcv order 'quasi_random' needs world_size 1 and os_cache False (FFCV 1.0.2)")
    device = torch.device(device)
    beton = _beton_for(source=source, data_path=data_path, synthetic_params=synthetic_params,
                       max_resolution=max_resolution, num_workers=num_workers)
    table = read_beton_table(beton)
    # Each batch FFCV prepares ahead, and its scratch copy, holds batch_size padded images of the largest size.
    buffer_bytes = 2 * (batches_ahead + 2) * batch_size * int(table.heights.max()) * int(table.widths.max()) * 3
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if buffer_bytes > memory // 2:
        raise BetonError(f"{beton}: its largest images ({table.heights.max()} rows, {table.widths.max()} columns) make "
                         f"decode buffers of {buffer_bytes / 2**30:.1f} GiB at batch {batch_size}, more than half of "
                         f"this machine's {memory / 2**30:.1f} GiB: convert it with a smaller --max-resolution")
    # DATA_LIMIT keeps the first data_limit files of the listing, as the reference loader does.
    records = np.arange(len(table.labels)) if data_limit <= 0 else np.flatnonzero(table.indices < data_limit)
    sampler = EpochBatchSampler(len(records), batch_size=batch_size, drop_last=drop_last, shuffle=True,
                                seed=seed, rank=rank, world_size=world_size)

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loader = Loader(
        str(beton), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, drop_last=False,
        order=OrderOption.QUASI_RANDOM if order == "quasi_random" else OrderOption.SEQUENTIAL,
        indices=records, seed=seed, batches_ahead=batches_ahead,
        pipelines={
            "image": [PaddedRGBDecoder(), ToTensor(), *to_device],
            "label": [IntDecoder(), ToTensor(), *to_device],
            "index": [IntDecoder(), ToTensor(), *to_device],
        },
    )
    if order == "quasi_random":
        quasi_random = loader.traversal_order.sample_order

        def order_of_epoch(epoch: int) -> np.ndarray:
            records_of_epoch = quasi_random(epoch)
            return records_of_epoch[: len(sampler) * batch_size] if drop_last else records_of_epoch
    else:
        def order_of_epoch(epoch: int) -> np.ndarray:
            sampler.set_epoch(epoch)
            return records[sampler.rank_indices()]
    traversal = _EpochTraversal(order_of_epoch, batch_size=batch_size)
    # FFCV asks its traversal order for each epoch's sample order; ours also knows the rank.
    loader.traversal_order = traversal
    loader.first_traversal_order = order_of_epoch(0)

    sizes = torch.from_numpy(np.stack([table.heights, table.widths], axis=1))
    return FFCVTrainLoader(
        loader=loader, traversal=traversal, multicrop=DeviceMultiCrop(recipe, dtype=dtype, device=device),
        record_indices=torch.from_numpy(table.indices).to(device), sizes=sizes.to(device),
        num_samples=len(records), num_batches=len(sampler),
        has_labels=bool(table.labels.min() >= 0),
        seed=seed, rank=rank, device=device, channels_last=channels_last,
    )


def _beton_for(*, source: str, data_path: str | None, synthetic_params: dict | None, max_resolution: int,
               num_workers: int) -> Path:
    """The .beton to read: data_path itself, or the cached conversion of an image folder.

    The cache is keyed by a digest of the folder's contents (every file's name, label and bytes: a changed
    image is a new key), and beside each .beton fastssl writes a record of what it converted: that digest,
    the .beton's own digest and size, and its number of records. A cached file that does not match its
    record (planted, edited, cut short) or has none is converted again, with a warning.
    """
    if source == "ffcv":
        if not data_path or not Path(data_path).is_file():
            raise FileNotFoundError(f"ffcv source: no .beton at {data_path!r}")
        return Path(data_path)
    folder = resolve_image_folder(source=source, data_path=data_path, split="train", synthetic_params=synthetic_params)
    listing = list_samples(folder, data_limit=-1)
    source_digest = _contents_digest(folder, listing, max_resolution=max_resolution, num_workers=num_workers)
    beton = cache_dir() / "ffcv" / f"{Path(folder).name}-{source_digest[:16]}.beton"
    record_path = beton.with_name(beton.name + ".json")
    if beton.exists():
        problem = _cache_mismatch(beton, record_path, source_digest=source_digest) or _listing_mismatch(beton, listing)
        if problem is None:
            return beton
        log.warning("cached %s %s: converting %s again", beton, problem, folder)
    written = convert_image_folder(folder, beton, max_resolution=max_resolution, write_mode="proportion",
                                   jpeg_quality=90, compress_probability=0.5, num_workers=num_workers, progress=False)
    record = {"source_digest": source_digest, "beton_digest": _file_digest(beton),
              "beton_bytes": beton.stat().st_size, "records": len(written)}
    temporary = record_path.with_name(f".{record_path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, record_path)
    problem = _listing_mismatch(beton, listing)
    if problem is not None:  # the folder changed during the conversion
        raise BetonError(f"{beton} {problem}")
    return beton


def _contents_digest(folder, listing: ImageList, *, max_resolution: int, num_workers: int) -> str:
    """blake2b of the conversion settings and, for every file of the listing, its path under `folder`, its
    label and its bytes (read in parallel: hashing releases the GIL)."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        file_digests = list(pool.map(_file_digest, listing.paths))
    digest = hashlib.blake2b(f"fastssl-ffcv-cache 1\n{max_resolution}\n".encode())
    for path, label, file_digest in zip(listing.paths, listing.labels.tolist(), file_digests):
        digest.update(f"{os.path.relpath(path, folder)}\0{label}\0{file_digest}\n".encode())
    return digest.hexdigest()


def _file_digest(path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()


def _cache_mismatch(beton: Path, record_path: Path, *, source_digest: str) -> str | None:
    """None when `beton` is the file fastssl converted for `source_digest`, else what differs."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return "has no record of its conversion"
    if not isinstance(record, dict) or record.get("source_digest") != source_digest:
        return "was not converted from these files"
    if beton.stat().st_size != record.get("beton_bytes") or _file_digest(beton) != record.get("beton_digest"):
        return "is not the file that was converted (its size or contents changed)"
    return None


def _listing_mismatch(beton: Path, listing: ImageList) -> str | None:
    """None when the records of `beton` are the folder's files (each with its label) less unreadable ones,
    else what differs. Only files missing from the .beton are decoded, up to the first readable one: an
    honest conversion misses only unreadable files, a planted one (64 records for a folder of 2,000) is
    found at once. Raises BetonError for a file that is not a valid .beton at all."""
    table = read_beton_table(beton)
    if table.indices[-1] >= len(listing) or not np.array_equal(table.labels, listing.labels[table.indices]):
        return f"holds {len(table.indices)} records that are not files of the {len(listing)} listed"
    missing = np.setdiff1d(np.arange(len(listing)), table.indices)
    readable = next((i for i in missing.tolist() if why_unreadable(listing.paths[i]) is None), None)
    if readable is not None:
        return (f"holds {len(table.indices)} records for {len(listing)} files, and lacks {listing.paths[readable]}, "
                "which decodes")
    return None


def _mix_seed(*values: int) -> int:
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)
