"""The run's data and the values derived from it: loaders built from DATA.*, and ``derive`` (global batch,
scaled LR schedule, iterations), also without data for ``fastssl-train --cfg job``. With fastssl/builder.py
(which uses it), fastssl/run_model.py and fastssl/config.py, one of the modules that read the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from loaders.build import build_eval_loader, build_train_loader
from loaders.images import list_samples, set_pixel_limit
from loaders.recipe import MultiCropRecipe, recipe_from_transforms
from loaders.sources import BUILT_IN_SOURCES, SOURCES
from loaders.sampler import EpochBatchSampler

from .config import ConfigError
from .methods.swav import rounded_queue_length
from .metrics import notice
from .optim import precompute_schedule, scale_lr_schedule


# ---------------- data ---------------------------------------------------------------------------

def data_source(cfg: DictConfig) -> tuple[str, str | None]:
    """(DATA.TRAIN's source, its path or None); a source without a path is the built-in dataset (synthetic,
    or Fashion-MNIST, which needs none)."""
    train_cfg = cfg.DATA.TRAIN
    sources = list(train_cfg.DATA_SOURCES) or ["synthetic"]
    if len(sources) != 1:
        raise ConfigError("config.DATA.TRAIN.DATA_SOURCES takes one source")
    source, paths = sources[0], list(train_cfg.DATA_PATHS)
    if source not in SOURCES:
        raise ConfigError(f"config.DATA.TRAIN.DATA_SOURCES: unknown source {source!r} ({', '.join(SOURCES)})")
    if source not in BUILT_IN_SOURCES and not paths:
        notice(f"DATA_SOURCES=[{source}] but no DATA_PATHS given: using the built-in synthetic dataset")
        source = "synthetic"
    return source, (paths[0] if paths and source not in BUILT_IN_SOURCES else None)


def synthetic_params(cfg: DictConfig) -> dict:
    """The built-in sources' parameters (DATA.TRAIN.SYNTHETIC; Fashion-MNIST's subset under "fashion_mnist")."""
    synthetic, fashion = cfg.DATA.TRAIN.SYNTHETIC, cfg.DATA.TRAIN.FASHION_MNIST
    return {"root": synthetic.ROOT or None, "image_size": synthetic.IMAGE_SIZE,
            "train_per_class": synthetic.TRAIN_PER_CLASS, "val_per_class": synthetic.VAL_PER_CLASS,
            "fashion_mnist": {"train_per_class": fashion.TRAIN_PER_CLASS, "test_per_class": fashion.TEST_PER_CLASS}}


def recipe(cfg: DictConfig) -> MultiCropRecipe:
    return recipe_from_transforms(OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS))


def backend_options(cfg: DictConfig) -> dict:
    """DATA.TRAIN.DALI / FFCV as keyword arguments of the chosen loader backend."""
    train_cfg = cfg.DATA.TRAIN
    if train_cfg.LOADER in ("dali", "ffcv"):
        options = train_cfg.DALI if train_cfg.LOADER == "dali" else train_cfg.FFCV
        return {key.lower(): value for key, value in OmegaConf.to_container(options).items()}
    return {}


def build_train_data(cfg: DictConfig, *, rank: int, world_size: int, device: torch.device, dtype: torch.dtype):
    """The multi-crop training loader of this rank (DATA.TRAIN, DATA.NUM_DATALOADER_WORKERS)."""
    source, data_path = data_source(cfg)
    train_cfg = cfg.DATA.TRAIN
    set_pixel_limit(cfg.DATA.MAX_IMAGE_PIXELS)
    loader = build_train_loader(
        source=source, data_path=data_path, backend=train_cfg.LOADER, recipe=recipe(cfg),
        batch_size=train_cfg.BATCHSIZE_PER_REPLICA, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        drop_last=train_cfg.DROP_LAST, data_limit=train_cfg.DATA_LIMIT, seed=cfg.SEED_VALUE, rank=rank,
        world_size=world_size, device=device, dtype=dtype, channels_last=cfg.MODEL.CHANNELS_LAST,
        synthetic_params=synthetic_params(cfg), backend_options=backend_options(cfg))
    if len(loader) == 0:
        raise ConfigError(f"{loader.num_samples} training samples make no full batch of "
                          f"{train_cfg.BATCHSIZE_PER_REPLICA} per replica x {world_size}")
    return loader


def build_eval_data(cfg: DictConfig, *, split: str, data_path: str | None, image_size: int, batch_size: int,
                    num_workers: int, device: torch.device, rank: int = 0, world_size: int = 1,
                    data_limit: int = -1, start_batch: int = 0, max_samples: int = 0):
    """One centre crop per image of ``split`` (train / val), in dataset order, normalised as in training.

    data_path: an image folder of that split; None: the training source's (for train), the built-in
    dataset's held-out split (for val). image_size 0: the recipe's first crop size. rank, world_size,
    start_batch: this rank's shard from that batch on; max_samples > 0: a fixed subset of at most that many,
    evenly spaced (see loaders.build.build_eval_loader).
    """
    source, train_path = data_source(cfg)
    run_recipe = recipe(cfg)
    set_pixel_limit(cfg.DATA.MAX_IMAGE_PIXELS)
    if data_path is None and split == "train":
        data_path = train_path
    if data_path is not None and source in BUILT_IN_SOURCES:
        source = "disk_folder"
    return build_eval_loader(source=source, data_path=data_path, split=split,
                             image_size=image_size or run_recipe.size_crops[0], batch_size=batch_size,
                             num_workers=num_workers, data_limit=data_limit, device=device, dtype=torch.float32,
                             synthetic_params=synthetic_params(cfg), mean=run_recipe.mean, std=run_recipe.std,
                             rank=rank, world_size=world_size, start_batch=start_batch, max_samples=max_samples)


TEST_TRANSFORM_KEYS = {"Resize": {"size"}, "CenterCrop": {"size"}, "ToTensor": set(), "Normalize": {"mean", "std"}}


def test_transform(cfg: DictConfig) -> dict:
    """DATA.TEST.TRANSFORMS (exactly Resize, CenterCrop, ToTensor, Normalize) as build_eval_loader's
    resize_size, image_size, mean and std."""
    transforms = OmegaConf.to_container(cfg.DATA.TEST.TRANSFORMS)
    names = [transform.get("name") for transform in transforms]
    if names != list(TEST_TRANSFORM_KEYS):
        raise ConfigError(f"config.DATA.TEST.TRANSFORMS must be {', '.join(TEST_TRANSFORM_KEYS)}, got {names}")
    for transform in transforms:
        extra = sorted(set(transform) - {"name"} - TEST_TRANSFORM_KEYS[transform["name"]])
        if extra:  # VISSL's interpolation: 3 (bicubic) among them; fastssl resizes bilinearly
            raise ConfigError(f"config.DATA.TEST.TRANSFORMS: {transform['name']} has no key {extra[0]!r} in fastssl "
                              f"(keys: {sorted(TEST_TRANSFORM_KEYS[transform['name']]) or 'none'})")
    resize, crop, _, normalize = transforms
    return {"resize_size": resize["size"], "image_size": crop["size"], "mean": tuple(normalize["mean"]),
            "std": tuple(normalize["std"])}


def build_test_data(cfg: DictConfig, *, rank: int, world_size: int, device: torch.device):
    """This rank's shard of the held-out split (DATA.TEST), in dataset order, one centre crop per image.
    DATA.TEST's synthetic source is the built-in dataset's held-out split (DATA.TRAIN.SYNTHETIC's), fashion_mnist
    Fashion-MNIST's test split (DATA.TRAIN.FASHION_MNIST.TEST_PER_CLASS images a class)."""
    test_cfg = cfg.DATA.TEST
    set_pixel_limit(cfg.DATA.MAX_IMAGE_PIXELS)
    sources, paths = list(test_cfg.DATA_SOURCES) or ["synthetic"], list(test_cfg.DATA_PATHS)
    if len(sources) != 1 or sources[0] not in (*BUILT_IN_SOURCES, "disk_folder"):
        raise ConfigError(f"config.DATA.TEST.DATA_SOURCES takes one source, synthetic, fashion_mnist or disk_folder, "
                          f"got {sources}")
    source = sources[0]
    if source == "disk_folder" and not paths:
        train_source = data_source(cfg)[0]
        if train_source not in BUILT_IN_SOURCES:
            raise ConfigError("config.DATA.TEST.DATA_SOURCES=[disk_folder] needs DATA.TEST.DATA_PATHS, the held-out "
                              "image folder")
        notice(f"DATA.TEST.DATA_SOURCES=[disk_folder] but no DATA_PATHS given: testing on the held-out split of "
               f"{train_source}, as training uses it")
        source = train_source
    return build_eval_loader(source=source, data_path=paths[0] if source == "disk_folder" else None, split="val",
                             batch_size=test_cfg.BATCHSIZE_PER_REPLICA, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
                             data_limit=test_cfg.DATA_LIMIT, device=device, dtype=torch.float32,
                             synthetic_params=synthetic_params(cfg), rank=rank, world_size=world_size,
                             **test_transform(cfg))


# ---------------- derived values ----------------------------------------------------------------

@dataclass(frozen=True)
class Derived:
    """Every value computed from the config and the run, in one place (logged once)."""

    world_size: int
    batch_size_per_replica: int
    global_batch_size: int
    num_train_samples: int
    iterations_per_epoch: int
    total_iterations: int
    num_crops: int
    crop_sizes: list
    lr_schedule: np.ndarray  # (total_iterations,)

    def summary(self) -> str:
        lr = self.lr_schedule
        return (f"world size {self.world_size}, batch {self.batch_size_per_replica} per replica "
                f"({self.global_batch_size} global), {self.num_train_samples} training samples, "
                f"{self.iterations_per_epoch} iterations per epoch ({self.total_iterations} in all), "
                f"crops {self.crop_sizes}, lr start {lr[0]:.4g} peak {lr.max():.4g} end {lr[-1]:.4g}")


# The schedules hold one value a step: 2^25 steps is 256 MB of them, and 40x any published recipe's run.
MAX_TOTAL_STEPS = 1 << 25


def derive(cfg: DictConfig, *, world_size: int, num_samples: int, iterations_per_epoch: int) -> Derived:
    optim_cfg = cfg.OPTIMIZER
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    global_batch = batch * world_size
    run_recipe = recipe(cfg)
    lr_spec = OmegaConf.to_container(optim_cfg.param_schedulers.lr)
    scaling = lr_spec.pop("auto_lr_scaling")
    update_interval = lr_spec.pop("update_interval")
    if scaling["auto_scale"]:
        lr_spec = scale_lr_schedule(lr_spec, base_value=scaling["base_value"],
                                    base_lr_batch_size=scaling["base_lr_batch_size"], global_batch=global_batch,
                                    batch_per_node=batch * cfg.DISTRIBUTED.NUM_PROC_PER_NODE,
                                    scaling_type=scaling["scaling_type"])
    total = optim_cfg.num_epochs * iterations_per_epoch
    if total <= 0:
        raise ConfigError(f"config.OPTIMIZER.num_epochs={optim_cfg.num_epochs} leaves nothing to train")
    if total > MAX_TOTAL_STEPS:
        raise ConfigError(f"config.OPTIMIZER.num_epochs={optim_cfg.num_epochs} x {iterations_per_epoch} iterations per "
                          f"epoch is {total} steps, more than the {MAX_TOTAL_STEPS} a run may take")
    lr = precompute_schedule(lr_spec, total_steps=total, steps_per_epoch=iterations_per_epoch,
                             update_interval=update_interval)
    return Derived(world_size=world_size, batch_size_per_replica=batch, global_batch_size=global_batch,
                   num_train_samples=num_samples, iterations_per_epoch=iterations_per_epoch,
                   total_iterations=total, num_crops=run_recipe.total_num_crops,
                   crop_sizes=run_recipe.crop_sizes, lr_schedule=lr)


def planned_num_samples(cfg: DictConfig) -> tuple[int | None, str]:
    """The training set's size without building a loader, and how it was found (for ``--cfg job``):
    the built-in dataset's from SYNTHETIC.TRAIN_PER_CLASS x 10 classes (nothing generated), a folder's
    by counting its files; DATA_LIMIT applies. None for a .beton (its size is read when it opens)."""
    source, data_path = data_source(cfg)
    train_cfg = cfg.DATA.TRAIN
    if source == "synthetic":
        size = train_cfg.SYNTHETIC.TRAIN_PER_CLASS * 10
        how = "built-in synthetic dataset: SYNTHETIC.TRAIN_PER_CLASS x 10 classes, not generated"
    elif source == "fashion_mnist":
        per_class = train_cfg.FASHION_MNIST.TRAIN_PER_CLASS
        size = 60_000 if per_class < 0 else min(per_class, 6_000) * 10
        how = "Fashion-MNIST: FASHION_MNIST.TRAIN_PER_CLASS x 10 classes (6,000 each at most)"
    elif source == "disk_folder":
        size, how = len(list_samples(data_path, data_limit=-1)), f"counted the images of {data_path}"
    else:
        return None, f"{data_path} is a .beton: its size is read when the loader opens it"
    if train_cfg.DATA_LIMIT > 0 and train_cfg.DATA_LIMIT < size:
        size, how = train_cfg.DATA_LIMIT, f"{how}; DATA_LIMIT {train_cfg.DATA_LIMIT}"
    return size, how


def planned_derived(cfg: DictConfig) -> tuple[Derived | None, str]:
    """``derive`` for the configured world (NUM_NODES x NUM_PROC_PER_NODE) without building the data, and
    how the dataset size was found (see planned_num_samples; None where it is unknown)."""
    num_samples, how = planned_num_samples(cfg)
    if num_samples is None:
        return None, how
    train_cfg = cfg.DATA.TRAIN
    world_size = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    iterations = len(EpochBatchSampler(num_samples, batch_size=train_cfg.BATCHSIZE_PER_REPLICA,
                                       drop_last=train_cfg.DROP_LAST, shuffle=True, seed=cfg.SEED_VALUE, rank=0,
                                       world_size=world_size))
    return derive(cfg, world_size=world_size, num_samples=num_samples, iterations_per_epoch=iterations), how


def describe_job(cfg: DictConfig) -> str:
    """``fastssl-train ... --cfg job``: the composed, validated config as YAML, then the derived values for
    the configured world (NUM_NODES x NUM_PROC_PER_NODE), computed as a run computes them but without data."""
    distributed = cfg.DISTRIBUTED
    world_size = distributed.NUM_NODES * distributed.NUM_PROC_PER_NODE
    lines = [OmegaConf.to_yaml(OmegaConf.create({"config": OmegaConf.to_container(cfg)})).rstrip(), "",
             f"# derived values for {distributed.NUM_NODES} node(s) x {distributed.NUM_PROC_PER_NODE} process(es)"]
    try:
        derived, how = planned_derived(cfg)
    except ValueError as error:  # e.g. the built-in dataset cannot fill one batch on every rank of this world
        derived, how = None, f"no derived values for this world: {str(error).splitlines()[0]}"
    lines.append(f"# training samples: {derived.num_train_samples if derived else 'unknown'} ({how})")
    if derived is None:
        return "\n".join(lines)
    lr = derived.lr_schedule
    per_replica = derived.batch_size_per_replica
    lines += [f"# global batch: {derived.global_batch_size} ({per_replica} per replica x {world_size})",
              f"# iterations: {derived.iterations_per_epoch} per epoch, {derived.total_iterations} in all",
              f"# lr (scaled): start {lr[0]:.6g} peak {lr.max():.6g} end {lr[-1]:.6g}",
              f"# crops: {derived.num_crops} of sizes {derived.crop_sizes}"]
    if cfg.LOSS.name == "swav_loss":
        queue_length = cfg.LOSS.swav_loss.queue.queue_length
        rounded = rounded_queue_length(queue_length, global_batch_size=derived.global_batch_size)
        lines.append(f"# swav queue: {rounded} ({rounded // world_size} per rank), from iteration "
                     f"{cfg.LOSS.swav_loss.queue.start_iter}")
    lines.append(f"# checkpoints: {Path(cfg.CHECKPOINT.DIR).resolve()}")
    return "\n".join(lines)


def launch_resources(cfg: DictConfig) -> dict:
    """What a scheduler must give one job (for the submitit launchers): nodes, tasks per node, GPUs per node,
    and the checkpoint directory, the default home of a sweep."""
    distributed = cfg.DISTRIBUTED
    return {"nodes": distributed.NUM_NODES, "tasks_per_node": distributed.NUM_PROC_PER_NODE,
            "gpus_per_node": distributed.NUM_PROC_PER_NODE if cfg.MACHINE.DEVICE == "gpu" else 0,
            "checkpoint_dir": str(Path(cfg.CHECKPOINT.DIR).resolve())}
