"""fastssl-train: the entry point. The only place that reads the config (STYLE.md, "Configuration").

    fastssl-train config=pretrain/swav/swav_8node_resnet config.LOSS.swav_loss.temperature=0.2

Derived values (dataset size, global batch, scaled LR, queue length, iterations) are computed in
``derive`` and logged once; everything below is called with explicit keyword arguments.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from loaders.build import build_train_loader
from loaders.recipe import recipe_from_transforms

from . import dist, launch
from .checkpoint import latest_checkpoint, load_checkpoint, rank_state_path, set_rng_state
from .config import ConfigError, compose_config
from .engine import LoopSettings, NonFiniteLossError, TrainState, train
from .methods import METHODS, RunInfo
from .metrics import RunLogger
from .models import build_model, build_trunk, fit_head_to_trunk
from .optim import build_optimizer, precompute_schedule, scale_lr_schedule


def notice(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one copy per job, not per worker
        print(f"fastssl: {message}", file=sys.stderr, flush=True)


def select_device(cfg: DictConfig, info: dist.DistInfo) -> torch.device:
    if cfg.MACHINE.DEVICE == "gpu":
        if torch.cuda.is_available():
            # A launcher that gives each worker one GPU (srun --gpus-per-task=1) leaves it index 0.
            index = 0 if torch.cuda.device_count() == 1 else info.local_rank
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        notice("MACHINE.DEVICE=gpu but no CUDA device is visible: training on the CPU")
    elif cfg.MACHINE.DEVICE != "cpu":
        raise ConfigError(f"config.MACHINE.DEVICE must be gpu or cpu, got {cfg.MACHINE.DEVICE!r}")
    return torch.device("cpu")


def select_amp(cfg: DictConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype (None: full precision) and whether a GradScaler is needed (fp16 only)."""
    amp = cfg.MODEL.AMP_PARAMS
    if not amp.USE_AMP:
        return None, False
    if amp.AMP_TYPE == "apex" or amp.AMP_ARGS.opt_level not in (None, "O1"):
        notice(f"Apex AMP (opt_level {amp.AMP_ARGS.opt_level}) is mapped to native torch.autocast")
    if device.type != "cuda":
        notice("MODEL.AMP_PARAMS.USE_AMP is ignored on the CPU: training in float32")
        return None, False
    choice = amp.AMP_DTYPE
    if choice == "auto":
        choice = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if choice not in ("bfloat16", "float16"):
        raise ConfigError(f"config.MODEL.AMP_PARAMS.AMP_DTYPE must be auto, bfloat16 or float16, got {choice!r}")
    return getattr(torch, choice), choice == "float16"


def data_source(cfg: DictConfig) -> tuple[str, str | None]:
    train_cfg = cfg.DATA.TRAIN
    sources = list(train_cfg.DATA_SOURCES) or ["synthetic"]
    if len(sources) != 1:
        raise ConfigError("config.DATA.TRAIN.DATA_SOURCES takes one source")
    source, paths = sources[0], list(train_cfg.DATA_PATHS)
    if source not in ("synthetic", "disk_folder", "ffcv"):
        raise ConfigError(f"config.DATA.TRAIN.DATA_SOURCES: unknown source {source!r} (synthetic, disk_folder, ffcv)")
    if source != "synthetic" and not paths:
        notice(f"DATA_SOURCES=[{source}] but no DATA_PATHS given: using the built-in synthetic dataset")
        source = "synthetic"
    return source, (paths[0] if paths and source != "synthetic" else None)


def backend_options(cfg: DictConfig) -> dict:
    """DATA.TRAIN.DALI / FFCV as keyword arguments of the chosen loader backend."""
    train_cfg = cfg.DATA.TRAIN
    if train_cfg.LOADER == "dali":
        return {key.lower(): value for key, value in OmegaConf.to_container(train_cfg.DALI).items()}
    if train_cfg.LOADER == "ffcv":
        return {key.lower(): value for key, value in OmegaConf.to_container(train_cfg.FFCV).items()}
    return {}


def derive(cfg: DictConfig, *, world_size: int, num_samples: int, iterations_per_epoch: int) -> dict:
    """Every value computed from the config and the run, in one place (logged once)."""
    train_cfg, optim_cfg = cfg.DATA.TRAIN, cfg.OPTIMIZER
    batch = train_cfg.BATCHSIZE_PER_REPLICA
    global_batch = batch * world_size
    recipe = recipe_from_transforms(OmegaConf.to_container(train_cfg.TRANSFORMS))
    lr_spec = OmegaConf.to_container(optim_cfg.param_schedulers.lr)
    scaling = lr_spec.pop("auto_lr_scaling")
    update_interval = lr_spec.pop("update_interval")
    if scaling["auto_scale"]:
        lr_spec = scale_lr_schedule(lr_spec, base_value=scaling["base_value"],
                                    base_lr_batch_size=scaling["base_lr_batch_size"], global_batch=global_batch,
                                    batch_per_node=batch * cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
    total = optim_cfg.num_epochs * iterations_per_epoch
    lr = precompute_schedule(lr_spec, total_steps=total, steps_per_epoch=iterations_per_epoch,
                             update_interval=update_interval)
    derived = {"world_size": world_size, "batch_size_per_replica": batch, "global_batch_size": global_batch,
               "num_train_samples": num_samples, "iterations_per_epoch": iterations_per_epoch,
               "total_iterations": total, "num_crops": recipe.total_num_crops, "recipe": recipe,
               "lr_schedule": lr, "lr_spec": lr_spec}
    loss = OmegaConf.to_container(cfg.LOSS[cfg.LOSS.name]) if cfg.LOSS.name in cfg.LOSS else {}
    derived["loss_params"] = loss
    return derived


def resolve_head_params(cfg: DictConfig) -> list:
    """MODEL.HEAD.PARAMS fitted to the run: the first head's input follows the trunk's feature_dim, and
    the last head's output follows LOSS.<name>.memory_params.embedding_dim where the loss sets one
    (the DeepClusterV2 page changes the projection with that key). A notice says what changed."""
    trunk = cfg.MODEL.TRUNK
    with torch.device("meta"):
        feature_dim = build_trunk(trunk.NAME, resnet=OmegaConf.to_container(trunk.RESNETS),
                                  regnet=_regnet_params(cfg)).feature_dim
    head_params, changed = fit_head_to_trunk(OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS), feature_dim)
    if changed:
        notice(f"MODEL.HEAD.PARAMS[0] dims[0] set to the trunk's feature_dim {feature_dim}")
    loss = cfg.LOSS.get(cfg.LOSS.name) or {}
    embedding_dim = (loss.get("memory_params") or {}).get("embedding_dim")
    if embedding_dim is not None and head_params and head_params[-1][1]["dims"][-1] != embedding_dim:
        name, kwargs = head_params[-1]
        head_params = [*head_params[:-1], [name, {**kwargs, "dims": [*kwargs["dims"][:-1], embedding_dim]}]]
        notice(f"MODEL.HEAD.PARAMS[-1] output dim set to LOSS.{cfg.LOSS.name}.memory_params.embedding_dim "
               f"{embedding_dim}")
    return head_params


def _regnet_params(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.MODEL.TRUNK.REGNET).items() if v is not None}


def build_run_model(cfg: DictConfig, *, head_params: list, on_meta: bool = False) -> torch.nn.Module:
    """MODEL.TRUNK + the resolved heads, on the meta device when asked (for checks of huge models)."""
    trunk = cfg.MODEL.TRUNK
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        return build_model(trunk_name=trunk.NAME, resnet=OmegaConf.to_container(trunk.RESNETS),
                           regnet=_regnet_params(cfg), alexnet=None, head_params=head_params,
                           channels_last=cfg.MODEL.CHANNELS_LAST)


def frozen_parameters(model: torch.nn.Module, frozen_map) -> list:
    """MODEL.TEMP_FROZEN_PARAMS_ITER_MAP -> [([param], until_step)]; VISSL's names are accepted."""
    named = dict(model.named_parameters())
    frozen = []
    for name, iterations in frozen_map:
        ours = re.sub(r"prototypes(\d+)", r"prototypes.\1", re.sub(r"^(module\.)", "", name))
        if ours not in named:
            raise ConfigError(f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP names {name!r}, which is not a parameter "
                              f"of this model (e.g. {next(iter(named))!r})")
        frozen.append(([named[ours]], int(iterations)))
    return frozen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> TrainState:
    """Train in this process: the only one, or one worker of a distributed run (see launch.py)."""
    info = dist.from_environment()
    device = select_device(cfg, info)
    # DISTRIBUTED.TIMEOUT_SECONDS bounds the wait of
    # the ranks left in a collective when another one dies outside fastssl's launcher.
    dist.init_process_group(info, backend=cfg.DISTRIBUTED.BACKEND, init_method=cfg.DISTRIBUTED.INIT_METHOD,
                            device=device, timeout_s=cfg.DISTRIBUTED.TIMEOUT_SECONDS)
    # Before the loader forks its workers, so that they inherit the handler (see StopOnSignal).
    stop = dist.StopOnSignal(check_every=cfg.LOG_FREQUENCY, group=dist.control_group(device))
    try:
        return _train_run(cfg, info=info, device=device, stop=stop)
    finally:
        stop.close()


def _train_run(cfg: DictConfig, *, info: dist.DistInfo, device: torch.device, stop: dist.StopOnSignal) -> TrainState:
    autocast_dtype, needs_scaler = select_amp(cfg, device)
    if cfg.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN and cfg.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE == "apex":
        notice("SYNC_BN_TYPE apex is mapped to torch.nn.SyncBatchNorm")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.SEED_VALUE + info.rank)

    # ---------------- data ------------------------------------------------------------------
    source, data_path = data_source(cfg)
    train_cfg = cfg.DATA.TRAIN
    recipe = recipe_from_transforms(OmegaConf.to_container(train_cfg.TRANSFORMS))
    synthetic = train_cfg.SYNTHETIC
    loader = build_train_loader(
        source=source, data_path=data_path, backend=train_cfg.LOADER, recipe=recipe,
        batch_size=train_cfg.BATCHSIZE_PER_REPLICA, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        drop_last=train_cfg.DROP_LAST, data_limit=train_cfg.DATA_LIMIT, seed=cfg.SEED_VALUE, rank=info.rank,
        world_size=info.world_size, device=device, dtype=autocast_dtype or torch.float32,
        channels_last=cfg.MODEL.CHANNELS_LAST,
        synthetic_params={"root": synthetic.ROOT or None, "image_size": synthetic.IMAGE_SIZE,
                          "train_per_class": synthetic.TRAIN_PER_CLASS, "val_per_class": synthetic.VAL_PER_CLASS},
        backend_options=backend_options(cfg))
    if len(loader) == 0:
        raise ConfigError(f"{loader.num_samples} training samples make no full batch of "
                          f"{train_cfg.BATCHSIZE_PER_REPLICA} per replica x {info.world_size}")

    # ---------------- derived values (logged once) ---------------------------------------------
    derived = derive(cfg, world_size=info.world_size, num_samples=loader.num_samples,
                     iterations_per_epoch=len(loader))
    checkpoint_dir = str(Path(cfg.CHECKPOINT.DIR).resolve())
    if info.is_main:
        shown = {k: v for k, v in derived.items() if k not in ("lr_schedule", "recipe", "lr_spec", "loss_params")}
        lr = derived["lr_schedule"]
        notice(f"derived: {shown}, lr start {lr[0]:.4g} peak {lr.max():.4g} end {lr[-1]:.4g}, "
               f"crops {derived['recipe'].crop_sizes}, device {device}, amp {autocast_dtype}, "
               f"checkpoints {checkpoint_dir}")

    # ---------------- model, method, optimizer -------------------------------------------------
    head_params = resolve_head_params(cfg)
    model = build_run_model(cfg, head_params=head_params).to(device)
    sync_bn = cfg.MODEL.SYNC_BN_CONFIG
    if sync_bn.CONVERT_BN_TO_SYNC_BN and info.world_size > 1:  # on one process SyncBN is plain BN
        bn_group = dist.sync_bn_process_group(rank=info.rank, world_size=info.world_size,
                                              local_world_size=info.local_world_size, group_size=sync_bn.GROUP_SIZE)
        model = dist.convert_sync_batchnorm(model, process_group=bn_group, device=device)
    if cfg.LOSS.name not in METHODS:
        raise ConfigError(f"config.LOSS.name {cfg.LOSS.name!r} is not one of {sorted(METHODS)}")
    loss_params = {**derived["loss_params"], "output_dir": derived["loss_params"].get("output_dir") or checkpoint_dir}
    run_info = RunInfo(rank=info.rank, world_size=info.world_size,
                       batch_size_per_replica=derived["batch_size_per_replica"],
                       global_batch_size=derived["global_batch_size"], num_crops=derived["num_crops"],
                       num_train_samples=derived["num_train_samples"],
                       iterations_per_epoch=derived["iterations_per_epoch"],
                       total_iterations=derived["total_iterations"], output_dir=loss_params["output_dir"],
                       device=device, head_params=head_params,
                       drop_last=train_cfg.DROP_LAST, process_group=dist.global_group())
    method = METHODS[cfg.LOSS.name].from_config(loss_params, run_info).to(device)
    method.bind(model)
    notice(f"method {cfg.LOSS.name}: {method.describe()}")
    optim_cfg = cfg.OPTIMIZER
    optimizer = build_optimizer(model, name=optim_cfg.name, momentum=optim_cfg.momentum,
                                nesterov=optim_cfg.nesterov, weight_decay=optim_cfg.weight_decay,
                                regularize_bn=optim_cfg.regularize_bn, regularize_bias=optim_cfg.regularize_bias,
                                use_larc=optim_cfg.use_larc, larc_clip=optim_cfg.larc_config.clip,
                                larc_trust_coefficient=optim_cfg.larc_config.trust_coefficient,
                                larc_eps=optim_cfg.larc_config.eps)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    frozen = frozen_parameters(model, OmegaConf.to_container(cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP))
    trained_model = dist.wrap_ddp(model, device=device) if info.world_size > 1 else model
    if cfg.MODEL.TORCH_COMPILE:
        trained_model = torch.compile(trained_model)

    # ---------------- resume ----------------------------------------------------------------
    state = TrainState()
    previous = latest_checkpoint(checkpoint_dir) if cfg.CHECKPOINT.AUTO_RESUME else None
    if previous is not None:
        saved = load_checkpoint(previous, map_location=device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved["scaler"] is not None:
            scaler.load_state_dict(saved["scaler"])
        own = rank_state_path(checkpoint_dir, step=saved["step"], rank=info.rank)
        if info.rank > 0 and own.exists():
            saved.update(load_checkpoint(own, map_location=device))  # this rank's method state and streams
        elif info.rank > 0:
            print(f"fastssl: no per-rank state {own.name}: rank {info.rank} resumes with rank 0's method state",
                  file=sys.stderr)
        method.load_state_dict(saved["method"])
        set_rng_state(saved["rng"])
        state = TrainState(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"])
        notice(f"resuming from {previous} (epoch {state.epoch}, step {state.step})")
    method.on_train_start(model=model, loader=loader, fresh_start=previous is None)

    # ---------------- train -----------------------------------------------------------------
    logger = RunLogger(directory=checkpoint_dir, enabled=info.is_main,
                       use_tensorboard=cfg.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD,
                       progress_bar=cfg.HOOKS.PROGRESS_BAR and sys.stdout.isatty(),
                       total_steps=derived["total_iterations"], start_step=state.step)
    settings = LoopSettings(
        num_epochs=optim_cfg.num_epochs, steps_per_epoch=derived["iterations_per_epoch"],
        lr_schedule=derived["lr_schedule"], autocast_dtype=autocast_dtype, log_frequency=cfg.LOG_FREQUENCY,
        checkpoint_dir=checkpoint_dir, checkpoint_every_epochs=cfg.CHECKPOINT.CHECKPOINT_FREQUENCY,
        checkpoint_every_steps=cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY, frozen_params=frozen, rank=info.rank,
        images_per_step=derived["global_batch_size"], stop_requested=stop,
        extra_state={"config": OmegaConf.to_container(cfg), "derived_world_size": info.world_size,
                     "head_params": head_params})  # as built: fitted to the trunk and the loss
    try:
        state = train(model=model, trained_model=trained_model, method=method, optimizer=optimizer, scaler=scaler,
                      loader=loader, state=state, settings=settings, logger=logger)
    finally:
        logger.close()
    if stop.stopped and state.step < derived["total_iterations"]:
        notice(f"stopped by a signal at step {state.step} with a checkpoint in {checkpoint_dir}; "
               "the same command resumes")
    else:
        notice(f"training finished at step {state.step}; checkpoints in {checkpoint_dir}")
    return state


def fail(message: str, status: int) -> int:
    """Print an error (a spawned worker hands it to its launcher, which prints the first one once)."""
    if not launch.record_error(message):
        print(message, file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """fastssl-train: run here, or spawn DISTRIBUTED.NUM_PROC_PER_NODE workers (see launch.py)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose_config(argv)
        distributed = cfg.DISTRIBUTED
        plan = launch.plan_launch(num_nodes=distributed.NUM_NODES, num_proc_per_node=distributed.NUM_PROC_PER_NODE,
                                  run_id=distributed.RUN_ID, environ=dict(os.environ),
                                  gpus_visible=torch.cuda.device_count() if cfg.MACHINE.DEVICE == "gpu"
                                  and torch.cuda.is_available() else None)
        if plan.notice:
            notice(plan.notice)
        if plan.spawn:
            return launch.run_workers(command=[sys.executable, "-m", "fastssl.train", *argv],
                                      num_workers=plan.spawn, node_rank=plan.node_rank, world_size=plan.world_size,
                                      master_addr=plan.master_addr, master_port=plan.master_port)
        os.environ.update(plan.worker_env)
        launch.exit_with_launcher()
        run(cfg)
    except ConfigError as error:
        return fail(f"fastssl-train: error: {error}", 2)
    except NonFiniteLossError as error:
        return fail(f"fastssl-train: error: {error}", 3)
    except (FileNotFoundError, ValueError, ImportError) as error:  # bad paths, lists, a backend not installed
        if os.environ.get("FASTSSL_DEBUG"):  # the traceback, for a bug rather than bad input
            raise
        return fail(f"fastssl-train: error: {error}", 2)
    except KeyboardInterrupt:
        print("fastssl-train: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    except Exception:
        if not launch.record_error(traceback.format_exc()):
            raise
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
