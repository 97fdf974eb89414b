"""The loader builders the trainer calls: a training loader and an evaluation loader.

Both yield loaders.batch.Batch on the training device. The training loader is resumable:
set_epoch(epoch, start_batch) reproduces an epoch's batches exactly from any batch on.
This module only picks the backend; each backend builds its own loader from the shared
modules (loaders.images, loaders.sampler, loaders.sources, loaders.recipe).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from loaders.folder import EvalLoader, FolderTrainLoader, build_eval_folder_loader, build_folder_loader
from loaders.recipe import MultiCropRecipe

if TYPE_CHECKING:
    from loaders.dali import DALITrainLoader
    from loaders.ffcv import FFCVTrainLoader

BACKENDS = ("torchvision", "dali", "ffcv")


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
) -> FolderTrainLoader | DALITrainLoader | FFCVTrainLoader:
    """The multi-crop training loader of one rank; the three backends' loaders have the same
    interface (len, num_samples, set_epoch(epoch, start_batch), iteration over Batches).

    backend_options: keyword arguments of the dali / ffcv builder (memory pools, prefetch, order).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    common = dict(source=source, data_path=data_path, recipe=recipe, batch_size=batch_size, num_workers=num_workers,
                  drop_last=drop_last, data_limit=data_limit, seed=seed, rank=rank, world_size=world_size,
                  device=device, dtype=dtype, channels_last=channels_last, synthetic_params=synthetic_params)
    if backend == "dali":
        from loaders.dali import build_dali_loader  # imports DALI only when its loader is built

        return build_dali_loader(backend=backend, **common, **(backend_options or {}))
    if backend == "ffcv":
        from loaders.ffcv import build_ffcv_loader  # imports FFCV (and numba) only when its loader is built

        return build_ffcv_loader(backend=backend, **common, **(backend_options or {}))
    if source == "ffcv":
        raise ValueError("DATA_SOURCES [ffcv] (a .beton) needs DATA.TRAIN.LOADER=ffcv")
    return build_folder_loader(**common)


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
    rank: int = 0,
    world_size: int = 1,
    resize_size: int | None = None,
    start_batch: int = 0,
    max_samples: int = 0,
) -> EvalLoader:
    """One centre crop per sample, in dataset order, nothing dropped (for kNN features, clustering
    passes, held-out accuracy); rank gets its contiguous shard (loaders.sampler.shard_of) and
    Batch.indices hold global dataset indices. Batch.crops holds one tensor. The short side is
    resized to resize_size (None: image_size / 0.875, ImageNet's 256 for 224), then the centre
    image_size crop is taken. start_batch: the rank's first batch (a resumed pass skips the
    batches it has done without reading them). max_samples > 0: at most that many samples, evenly spaced
    over the dataset order (a fixed subset; EvalLoader.shard holds the rank's dataset indices)."""
    if split not in ("train", "val"):
        raise ValueError(f"eval loader: split {split!r} is not 'train' or 'val'")
    return build_eval_folder_loader(
        source=source, data_path=data_path, split=split, image_size=image_size, batch_size=batch_size,
        num_workers=num_workers, data_limit=data_limit, device=device, dtype=dtype,
        synthetic_params=synthetic_params, mean=mean, std=std, rank=rank, world_size=world_size,
        resize_size=resize_size, start_batch=start_batch, max_samples=max_samples)
