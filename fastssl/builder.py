"""The run builder: turns a composed config into the run's objects, in one visible place.

Used by ``fastssl-train``, ``fastssl-eval`` and the benchmarks alike. With fastssl/run_data.py (the data and
the derived values) and fastssl/run_model.py (the model, its heads and initial weights), which it uses, and
fastssl/config.py, the only modules that read the config (STYLE.md, "Configuration"). Everything below them
is called with explicit keyword arguments.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import dist, launch
from .checkpoint import TrainingCheckpoint, check_checkpoint_directory
from .clusterfit import ClusterFeaturesJob
from .config import ROOT_DEFAULTS, ConfigError, check_config, validate
from .engine import LoopSettings
from .metrics import RunLogger, notice
from .monitor import EmbeddingMonitor, KnnMonitor, RunMonitor, preserved_random_state
from .methods import METHODS, Method, RunInfo
from .methods.swav import rounded_queue_length
from .models.model import SSLModel
from .optim import build_optimizer
from .run_data import (data_source, recipe, build_train_data, build_eval_data, build_test_data, Derived, derive)
from .run_model import (build_model_for_rank, build_run_model, check_feature_eval, check_num_classes, feature_eval,
                        frozen_parameters, resolve_head_params, weights_init_options)
from .weights import load_initial_weights


def config_from_checkpoint(saved: dict) -> DictConfig:
    """A checkpoint's own config, validated as a command line's is (a checkpoint may come from anywhere:
    its config names the folders that the commands read and generate into); keys added to fastssl since it
    was trained take their defaults (they do not change the architecture of a model already trained)."""
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict):
        raise ConfigError("the checkpoint holds no fastssl config (is it a fastssl training checkpoint?)")
    validate(config, ROOT_DEFAULTS)  # before merging: a mapping where a value belongs would break the merge
    merged = OmegaConf.merge(OmegaConf.create(ROOT_DEFAULTS), OmegaConf.create(config))
    return check_config(OmegaConf.to_container(merged, resolve=False))


# ---------------- machine and processes ----------------------------------------------------------

def plan_processes(cfg: DictConfig) -> launch.LaunchPlan:
    """Run here, or spawn DISTRIBUTED.NUM_PROC_PER_NODE workers (see launch.plan_launch)."""
    distributed = cfg.DISTRIBUTED
    gpus = torch.cuda.device_count() if cfg.MACHINE.DEVICE == "gpu" and torch.cuda.is_available() else None
    return launch.plan_launch(num_nodes=distributed.NUM_NODES, num_proc_per_node=distributed.NUM_PROC_PER_NODE,
                              run_id=distributed.RUN_ID, environ=dict(os.environ), gpus_visible=gpus)


def start_process_group(cfg: DictConfig, info: dist.DistInfo, device: torch.device) -> dist.StopOnSignal:
    """Join the run's process group and install the stop-on-signal vote (see dist.StopOnSignal).

    DISTRIBUTED.TIMEOUT_SECONDS bounds the wait of the ranks left in a collective when another one dies
    outside fastssl's launcher. Call before the loader forks its workers, so that they inherit the handler.
    """
    dist.init_process_group(info, backend=cfg.DISTRIBUTED.BACKEND, init_method=cfg.DISTRIBUTED.INIT_METHOD,
                            device=device, timeout_s=cfg.DISTRIBUTED.TIMEOUT_SECONDS)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dist.StopOnSignal(check_every=cfg.LOG_FREQUENCY, group=dist.control_group(device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ---------------- checks before any process starts (the model: fastssl/run_model.py) -------------

def preflight(cfg: DictConfig) -> None:
    """The checks of a config that need neither data nor a device, run before any process starts (and by
    ``--cfg job``): the transforms parse into a recipe, the heads build on the meta device (every key of
    MODEL.HEAD.PARAMS known, the dims chained), feature-evaluation heads fit their layers. A one-line
    ConfigError naming the problem, so a bad key never reaches a worker."""
    try:
        recipe(cfg)
        head_params = resolve_head_params(cfg, quiet=True)
        head_lr_scales(build_run_model(cfg, head_params=head_params, on_meta=True),
                       list(cfg.OPTIMIZER.head_lr_multipliers))
        if feature_eval(cfg):
            check_feature_eval(cfg, head_params=head_params)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error).splitlines()[0] if str(error) else type(error).__name__) from None


def check_checkpoint_dir(cfg: DictConfig) -> str | None:
    """CHECKPOINT.DIR, checked before any data or model is built: a one-line CheckpointError for a folder that
    cannot hold checkpoints, a notice for one holding files fastssl did not write (checkpoint.py)."""
    return check_checkpoint_directory(cfg.CHECKPOINT.DIR)


# ---------------- method -------------------------------------------------------------------------

def run_info(cfg: DictConfig, derived: Derived, *, rank: int, device: torch.device, head_params: list,
             autocast_dtype: torch.dtype | None = None, process_group=None) -> RunInfo:
    return RunInfo(rank=rank, world_size=derived.world_size, batch_size_per_replica=derived.batch_size_per_replica,
                   global_batch_size=derived.global_batch_size, num_crops=derived.num_crops,
                   num_train_samples=derived.num_train_samples, iterations_per_epoch=derived.iterations_per_epoch,
                   total_iterations=derived.total_iterations, device=device, head_params=head_params,
                   drop_last=cfg.DATA.TRAIN.DROP_LAST, autocast_dtype=autocast_dtype, process_group=process_group,
                   label_paths=tuple(cfg.DATA.TRAIN.LABEL_PATHS))


def _inferred_loss_keys(run: RunInfo, *, queue_length: int, checkpoint_dir: str) -> dict[str, dict[str, object]]:
    """LOSS keys that VISSL infers from the run whatever the config says (vissl/utils/hydra_config.py), with
    the values fastssl infers; dotted keys are nested."""
    head = run.head_params[-1][1] if run.head_params else {}
    queue_per_rank = rounded_queue_length(queue_length, global_batch_size=run.global_batch_size) // run.world_size
    return {
        "swav_loss": {"num_crops": run.num_crops, "embedding_dim": (head.get("dims") or [None])[-1],
                      "num_prototypes": head.get("num_clusters"), "output_dir": checkpoint_dir,
                      "queue.local_queue_length": queue_per_rank},
        "deepclusterv2_loss": {"num_crops": run.num_crops, "BATCHSIZE_PER_REPLICA": run.batch_size_per_replica,
                               "DROP_LAST": run.drop_last, "num_train_samples": run.num_train_samples},
        "nce_loss_with_memory": {"num_train_samples": run.num_train_samples},
    }


def build_method(cfg: DictConfig, run: RunInfo) -> Method:
    """LOSS.name's method from LOSS.<name>. Keys that VISSL infers (num_crops, num_train_samples, ...) may
    be set in a config, as VISSL's own files do; the inferred value is used, with a notice if they differ."""
    name = cfg.LOSS.name
    if name not in METHODS:
        raise ConfigError(f"config.LOSS.name {name!r} is not one of {sorted(METHODS)}")
    params = OmegaConf.to_container(cfg.LOSS[name]) if name in cfg.LOSS else {}
    inferred_keys = _inferred_loss_keys(run, queue_length=(params.get("queue") or {}).get("queue_length", 0),
                                        checkpoint_dir=str(Path(cfg.CHECKPOINT.DIR).resolve()))
    for key, inferred in inferred_keys.get(name, {}).items():
        *parents, leaf = key.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        given = node.pop(leaf, None)
        if given is not None and given != inferred:
            notice(f"config.LOSS.{name}.{key}={given} is inferred from the run: using {inferred}")
    return METHODS[name].from_config(params, run).to(run.device)


def build_optimizer_for(cfg: DictConfig, model: torch.nn.Module):
    optim_cfg = cfg.OPTIMIZER
    return build_optimizer(model, name=optim_cfg.name, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                           weight_decay=optim_cfg.weight_decay, regularize_bn=optim_cfg.regularize_bn,
                           regularize_bias=optim_cfg.regularize_bias, use_larc=optim_cfg.use_larc,
                           larc_clip=optim_cfg.larc_config.clip,
                           larc_trust_coefficient=optim_cfg.larc_config.trust_coefficient,
                           larc_eps=optim_cfg.larc_config.eps, eta=optim_cfg.eta,
                           exclude_bias_and_norm=optim_cfg.exclude_bias_and_norm,
                           lr_scales=head_lr_scales(model, list(optim_cfg.head_lr_multipliers)))


def head_lr_scales(model: torch.nn.Module, multipliers: list) -> dict[int, float]:
    """OPTIMIZER.head_lr_multipliers: id(parameter) -> multiplier of the LR for each head's parameters
    (one entry per MODEL.HEAD.PARAMS entry; empty: every head follows the schedule)."""
    if not multipliers:
        return {}
    heads = list(model.heads)
    if len(multipliers) != len(heads) or not all(isinstance(m, (int, float)) and m > 0 for m in multipliers):
        raise ValueError(f"config.OPTIMIZER.head_lr_multipliers must be [] or {len(heads)} positive numbers, one per "
                         f"MODEL.HEAD.PARAMS entry, got {multipliers}")
    return {id(param): float(m) for head, m in zip(heads, multipliers) for param in head.parameters()}


# ---------------- the whole run --------------------------------------------------------------------

@dataclass
class Run:
    """Everything the loop needs, built from one config for one rank."""

    device: torch.device
    loader: object
    derived: Derived
    model: SSLModel            # the plain module (checkpointed)
    trained_model: torch.nn.Module  # what the step runs: the module, or its DDP / compiled wrapper
    method: Method
    optimizer: object
    scaler: torch.amp.GradScaler | None
    checkpoint: TrainingCheckpoint
    settings: LoopSettings
    auto_resume: bool          # CHECKPOINT.AUTO_RESUME: continue from the latest checkpoint of the directory
    logger_options: dict       # RunLogger's keyword arguments but the start step
    test_loader: object = None  # this rank's shard of DATA.TEST with TEST_MODEL, for method.on_train_end

    def logger(self, *, start_step: int) -> RunLogger:
        return RunLogger(**self.logger_options, total_steps=self.derived.total_iterations, start_step=start_step)



def build_run(cfg: DictConfig, *, info: dist.DistInfo, device: torch.device, stop_requested) -> Run:
    """Data, derived values, model, method, optimizer, checkpointing and loop settings for this rank.
    Seeds every random stream first (SEED_VALUE + rank)."""
    seed_everything(cfg.SEED_VALUE + info.rank)
    autocast_dtype, needs_scaler = select_amp(cfg, device)
    loader = build_train_data(cfg, rank=info.rank, world_size=info.world_size, device=device,
                              dtype=autocast_dtype or torch.float32)
    derived = derive(cfg, world_size=info.world_size, num_samples=loader.num_samples,
                     iterations_per_epoch=len(loader))
    checkpoint_dir = Path(cfg.CHECKPOINT.DIR).resolve()
    notice(f"derived: {derived.summary()}; device {device}, amp {autocast_dtype}, checkpoints {checkpoint_dir}")

    head_params = resolve_head_params(cfg)
    if feature_eval(cfg):
        check_feature_eval(cfg, head_params=head_params)
        check_num_classes(cfg, head_params=head_params)
    test_loader = (build_test_data(cfg, rank=info.rank, world_size=info.world_size, device=device)
                   if cfg.TEST_MODEL else None)
    model = build_model_for_rank(cfg, head_params=head_params, info=info, device=device)
    method = build_method(cfg, run_info(cfg, derived, rank=info.rank, device=device, head_params=head_params,
                                        autocast_dtype=autocast_dtype, process_group=dist.global_group()))
    method.bind(model)
    notice(f"method {cfg.LOSS.name}: {method.describe()}")
    optimizer = build_optimizer_for(cfg, model)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    trained_model = dist.wrap_ddp(model, device=device) if info.world_size > 1 else model
    if cfg.MODEL.TORCH_COMPILE:
        trained_model = torch.compile(trained_model)

    checkpoint = TrainingCheckpoint(
        directory=checkpoint_dir, rank=info.rank, model=model, optimizer=optimizer, scaler=scaler, method=method,
        extra_state={"config": OmegaConf.to_container(cfg), "derived_world_size": info.world_size,
                     "head_params": head_params})  # as built: fitted to the trunk and the loss
    settings = LoopSettings(
        num_epochs=cfg.OPTIMIZER.num_epochs, steps_per_epoch=derived.iterations_per_epoch,
        lr_schedule=derived.lr_schedule, autocast_dtype=autocast_dtype, log_frequency=cfg.LOG_FREQUENCY,
        checkpoint_every_epochs=cfg.CHECKPOINT.CHECKPOINT_FREQUENCY,
        checkpoint_every_steps=cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY, frozen_params=frozen_parameters(cfg, model),
        rank=info.rank, images_per_step=derived.global_batch_size, stop_requested=stop_requested)
    settings.monitor = build_monitor(cfg, model=model, method=method, info=info, device=device)
    wandb = cfg.HOOKS.WANDB
    logger_options = dict(directory=checkpoint_dir, enabled=info.is_main,
                          use_tensorboard=cfg.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD,
                          progress_bar=cfg.HOOKS.PROGRESS_BAR and sys.stdout.isatty(),
                          wandb_options=dict(project=wandb.PROJECT, mode=wandb.MODE, config=OmegaConf.to_container(cfg))
                          if wandb.ENABLED else None)
    return Run(device=device, loader=loader, derived=derived, model=model, trained_model=trained_model, method=method,
               optimizer=optimizer, scaler=scaler, checkpoint=checkpoint, settings=settings,
               auto_resume=cfg.CHECKPOINT.AUTO_RESUME, logger_options=logger_options, test_loader=test_loader)


def knn_held_out_path(cfg: DictConfig) -> str | None:
    """The kNN monitor's held-out folder: DATA.TEST's where it names one, else the run's own held-out split as
    ``fastssl-eval knn`` finds it (None: the built-in dataset's)."""
    test = cfg.DATA.TEST
    if list(test.DATA_SOURCES) == ["disk_folder"] and list(test.DATA_PATHS):
        return test.DATA_PATHS[0]
    from .evaluate import held_out_folder  # fastssl/evaluate.py imports this module
    return held_out_folder(cfg, val_path=None, val_per_class=0)


def build_monitor(cfg: DictConfig, *, model: SSLModel, method: Method, info: dist.DistInfo,
                  device: torch.device) -> RunMonitor | None:
    """MONITOR.KNN's held-out kNN (its loaders: this rank's shards of a fixed subset of BANK_SIZE training
    images and of the held-out split) and MONITOR.EMBEDDING's figures; None when both are off. Built with
    every random stream left as it was, so that a run trains the same with the monitor and without."""
    knn_cfg, embedding_cfg = cfg.MONITOR.KNN, cfg.MONITOR.EMBEDDING
    if not (knn_cfg.ENABLED or embedding_cfg.ENABLED):
        return None
    knn = bank = None
    if knn_cfg.ENABLED:
        common = dict(image_size=0, batch_size=knn_cfg.BATCHSIZE_PER_REPLICA, device=device, rank=info.rank,
                      world_size=info.world_size, num_workers=min(cfg.DATA.NUM_DATALOADER_WORKERS, 2))
        try:
            with preserved_random_state(device):
                bank = build_eval_data(cfg, split="train", data_path=None, max_samples=knn_cfg.BANK_SIZE, **common)
                test = build_eval_data(cfg, split="val", data_path=knn_held_out_path(cfg), **common)
        except (FileNotFoundError, ValueError) as error:
            if list(cfg.DATA.TEST.DATA_PATHS):  # a held-out folder the user named must be there
                raise ConfigError(f"config.MONITOR.KNN: the held-out split cannot be read: {error}") from None
            # An image folder run names no held-out split: the monitor has nothing to score, the run goes on.
            notice(f"kNN monitor off: no labelled held-out split for this run ({str(error).splitlines()[0]}); give "
                   "DATA.TEST.DATA_SOURCES=[disk_folder] DATA.TEST.DATA_PATHS=[...] to watch its kNN")
            bank = None
    if bank is not None:
        knn = KnnMonitor(bank_loader=bank, test_loader=test, k=knn_cfg.K, temperature=knn_cfg.TEMPERATURE,
                         every_n_epochs=knn_cfg.EVERY_N_EPOCHS, num_epochs=cfg.OPTIMIZER.num_epochs,
                         group=dist.global_group())
        notice(f"kNN monitor: {len(bank.shard)} bank images on this rank, {len(test.shard)} held-out images, every "
               f"{knn_cfg.EVERY_N_EPOCHS} epoch(s)")
    embedding = None
    if embedding_cfg.ENABLED:
        embedding = EmbeddingMonitor(model=model, method=method, min_rank=embedding_cfg.MIN_RANK,
                                     min_std_ratio=embedding_cfg.MIN_STD_RATIO, patience=embedding_cfg.PATIENCE,
                                     stop_on_collapse=embedding_cfg.STOP_ON_COLLAPSE, group=dist.global_group())
    return RunMonitor(trunk=model.trunk, knn=knn, embedding=embedding)


# ---------------- ClusterFit step 1 (ENGINE_NAME cluster_features) -----------------------------------

ENGINES = ("train", "cluster_features")


def engine_name(cfg: DictConfig) -> str:
    """What the entry point runs: train (the loop) or cluster_features (fastssl/clusterfit.py)."""
    if cfg.ENGINE_NAME not in ENGINES:
        raise ConfigError(f"config.ENGINE_NAME must be one of {list(ENGINES)}, got {cfg.ENGINE_NAME!r}")
    return cfg.ENGINE_NAME


def build_cluster_features(cfg: DictConfig, *, info: dist.DistInfo, device: torch.device,
                           signal_received) -> ClusterFeaturesJob:
    """ClusterFit step 1 of this rank: the trunk of MODEL.WEIGHTS_INIT frozen in eval mode, this rank's
    loader over the training images (DATA.TRAIN, DATA_LIMIT included), CLUSTERFIT's settings."""
    clusterfit, features = cfg.CLUSTERFIT, cfg.CLUSTERFIT.FEATURES
    if clusterfit.CLUSTER_BACKEND != "faiss":
        raise ConfigError(f"config.CLUSTERFIT.CLUSTER_BACKEND must be faiss, got {clusterfit.CLUSTER_BACKEND!r}")
    if features.DATA_PARTITION != "TRAIN":
        raise ConfigError(f"config.CLUSTERFIT.FEATURES.DATA_PARTITION must be TRAIN, got {features.DATA_PARTITION!r}")
    if not cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE:
        raise ConfigError("ClusterFit step 1 clusters a trained trunk's features: set "
                          "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=<weights>")
    model = build_run_model(cfg, head_params=[])
    notice(load_initial_weights(model, **weights_init_options(cfg)).summary())
    trunk = model.trunk.to(device).eval().requires_grad_(False)
    if features.LAYER_NAME not in trunk.layer_names:
        raise ConfigError(f"config.CLUSTERFIT.FEATURES.LAYER_NAME {features.LAYER_NAME!r} is not one of "
                          f"{list(trunk.layer_names)}")
    seed_everything(cfg.SEED_VALUE + info.rank)

    def make_loader(start_batch: int):
        return build_eval_data(cfg, split="train", data_path=None, image_size=0,
                               batch_size=features.BATCHSIZE_PER_REPLICA, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
                               device=device, rank=info.rank, world_size=info.world_size,
                               data_limit=cfg.DATA.TRAIN.DATA_LIMIT, start_batch=start_batch)

    num_samples = make_loader(0).num_samples
    checkpoint_dir = Path(cfg.CHECKPOINT.DIR).resolve()
    dataset_name = features.DATASET_NAME or data_source(cfg)[0]
    return ClusterFeaturesJob(
        trunk=trunk, device=device, layer_name=features.LAYER_NAME, make_loader=make_loader, num_samples=num_samples,
        batch_size=features.BATCHSIZE_PER_REPLICA, rank=info.rank, world_size=info.world_size,
        features_dir=checkpoint_dir / (f"features_{dataset_name}_train_{features.LAYER_NAME}_{num_samples}samples_"
                                       f"{info.world_size}ranks_batch{features.BATCHSIZE_PER_REPLICA}"),
        output_dir=Path(clusterfit.OUTPUT_DIR).resolve() if clusterfit.OUTPUT_DIR else checkpoint_dir,
        output_prefix=f"{dataset_name}_train_{features.LAYER_NAME}", num_clusters=clusterfit.NUM_CLUSTERS,
        num_iter=clusterfit.N_ITER if clusterfit.N_ITER >= 0 else clusterfit.NUM_ITER, seed=cfg.SEED_VALUE,
        chunk_batches=features.CHUNK_BATCHES, max_batches=features.MAX_BATCHES,
        autocast_dtype=select_amp(cfg, device)[0],
        progress_bar=cfg.HOOKS.PROGRESS_BAR and sys.stdout.isatty(), signal_received=signal_received, notice=notice)
