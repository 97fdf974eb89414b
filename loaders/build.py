"""The loader builders the trainer calls: a training loader and an evaluation loader.

Both yield loaders.batch.Batch on the training device. The training loader is resumable:
set_epoch(epoch, start_batch) reproduces an epoch's batches exactly from any batch on.
"""
from __future__ import annotations

import signal

import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from loaders.batch import Batch
from loaders.folder import CenterCropFolder, EpochBatchSampler, MultiCropFolder
from loaders.recipe import MultiCropRecipe
from loaders.synthetic import ensure_synthetic_dataset

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "disk_folder", "ffcv")  # ffcv: a .beton, read by the ffcv backend only
BACKENDS = ("torchvision", "dali", "ffcv")
# The built-in dataset is a fixed benchmark: its content does not follow the training seed.
_SYNTHETIC_SEED = 0


def _ignore_sigterm(worker_id: int) -> None:
    """SLURM preemption signals every process: the workers leave the stop to the trainer, which
    checkpoints at the next step boundary and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainLoader:
    """Batches on the device from a DataLoader over (index, epoch) keys.

    num_samples: dataset size after DATA_LIMIT. len(): batches of a full epoch on this rank.
    skipped: {path: times replaced} of files that failed to decode (each logged once).
    """

    def __init__(
        self,
        *,
        dataset: torch.utils.data.Dataset,
        sampler: EpochBatchSampler,
        num_workers: int,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool,
        has_labels: bool,
    ):
        self.sampler = sampler
        self.num_samples = len(dataset)
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.has_labels = has_labels
        self.skipped: dict[str, int] = {}
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_crops,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=_ignore_sigterm,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its permutation and augmentations) and the batch to start from."""
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Batch]:
        for crops, indices, labels, failed in self.loader:
            for path in failed:
                if path not in self.skipped:
                    log.warning("skipping an unreadable image (replaced by the next readable one): %s", path)
                self.skipped[path] = self.skipped.get(path, 0) + 1
            yield Batch(
                crops=[self._to_device(crop) for crop in crops],
                indices=indices.to(self.device, non_blocking=True),
                labels=labels.to(self.device, non_blocking=True) if self.has_labels else None,
            )

    def _to_device(self, crop: torch.Tensor) -> torch.Tensor:
        # Copy float32 from pinned memory, then convert on the device (fast there, slow on the host).
        crop = crop.to(self.device, non_blocking=True)
        return crop.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)


def collate_crops(samples: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """Stack each crop position: [(crops, index, label, failed paths)] -> ([(B, 3, s, s)] per
    crop, (B,) int64 indices, (B,) int64 labels, failed paths of the batch)."""
    crops = [torch.stack(position) for position in zip(*(sample[0] for sample in samples))]
    indices = torch.tensor([sample[1] for sample in samples], dtype=torch.int64)
    labels = torch.tensor([sample[2] for sample in samples], dtype=torch.int64)
    failed = [path for sample in samples for path in sample[3]]
    return crops, indices, labels, failed


def resolve_image_folder(
    *, source: str, data_path: str | None, split: str, synthetic_params: dict[str, Any] | None
) -> Path:
    """The image folder of a source and split.

    synthetic: data_path is the dataset root (None or "": the default cache), generated on first
        use from synthetic_params {image_size, train_per_class, val_per_class}; split picks
        <root>/train or <root>/val.
    disk_folder: data_path is the folder of the requested split itself (VISSL's DATA_PATHS).
    """
    if source == "synthetic":
        if not synthetic_params:
            raise ValueError("source synthetic needs synthetic_params {image_size, train_per_class, val_per_class}")
        root = ensure_synthetic_dataset(
            data_path or None,
            image_size=synthetic_params["image_size"],
            train_per_class=synthetic_params["train_per_class"],
            val_per_class=synthetic_params["val_per_class"],
            seed=_SYNTHETIC_SEED,
        )
        return root / split
    if source == "disk_folder":
        if not data_path:
            raise ValueError("source disk_folder needs a data path (DATA.TRAIN.DATA_PATHS)")
        return Path(data_path)
    raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")


def build_train_loader(
    *,
    source: str,
    data_path: str | None,
    backend: str,
    recipe: MultiCropRecipe,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    data_limit: int,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    channels_last: bool = True,
    synthetic_params: dict[str, Any] | None = None,
    backend_options: dict[str, Any] | None = None,
) -> TrainLoader:
    """The multi-crop training loader for one rank (see TrainLoader and EpochBatchSampler).

    backend_options: keyword arguments of the dali / ffcv builder (memory pools, prefetch, order).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("dali", "ffcv"):
        from loaders import dali, ffcv  # each imports its library only when a loader is built
        build = dali.build_dali_loader if backend == "dali" else ffcv.build_ffcv_loader
        return build(source=source, data_path=data_path, backend=backend, recipe=recipe, batch_size=batch_size,
                     num_workers=num_workers, drop_last=drop_last, data_limit=data_limit, seed=seed, rank=rank,
                     world_size=world_size, device=device, dtype=dtype, channels_last=channels_last,
                     synthetic_params=synthetic_params, **(backend_options or {}))
    if source == "ffcv":
        raise ValueError("DATA_SOURCES [ffcv] (a .beton) needs DATA.TRAIN.LOADER=ffcv")
    folder = resolve_image_folder(source=source, data_path=data_path, split="train", synthetic_params=synthetic_params)
    dataset = MultiCropFolder(folder, recipe=recipe, seed=seed, data_limit=data_limit)
    sampler = EpochBatchSampler(
        len(dataset), batch_size=batch_size, drop_last=drop_last, shuffle=True,
        seed=seed, rank=rank, world_size=world_size,
    )
    return TrainLoader(
        dataset=dataset, sampler=sampler, num_workers=num_workers, device=torch.device(device),
        dtype=dtype, channels_last=channels_last, has_labels=dataset.files.has_labels,
    )


def build_eval_loader(
    *,
    source: str,
    data_path: str | None,
    split: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    data_limit: int,
    device: torch.device | str,
    dtype: torch.dtype,
    synthetic_params: dict[str, Any] | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> TrainLoader:
    """One centre crop per sample, in dataset order, nothing dropped, the whole dataset on
    every rank (for kNN features and clustering passes). Batch.crops holds one tensor."""
    if split not in ("train", "val"):
        raise ValueError(f"eval loader: split {split!r} is not 'train' or 'val'")
    folder = resolve_image_folder(source=source, data_path=data_path, split=split, synthetic_params=synthetic_params)
    dataset = CenterCropFolder(folder, image_size=image_size, mean=mean, std=std, data_limit=data_limit)
    sampler = EpochBatchSampler(
        len(dataset), batch_size=batch_size, drop_last=False, shuffle=False, seed=0, rank=0, world_size=1
    )
    return TrainLoader(
        dataset=dataset, sampler=sampler, num_workers=num_workers, device=torch.device(device),
        dtype=dtype, channels_last=True, has_labels=dataset.files.has_labels,
    )
