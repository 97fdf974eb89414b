"""The run's model from MODEL.*: the heads fitted to the trunk, the model built (on the meta device for the
checks), its initial weights, SyncBatchNorm and a frozen trunk, the parameters frozen for a while, the checks
of feature-evaluation heads and classifiers, and the arguments of a linear evaluation of a run's trunk.

Kept apart from fastssl/builder.py, which calls it (as fastssl/run_data.py holds the data): the model is
the larger half of building a run, and fastssl-eval and the benchmarks build a run's model without the
rest. With those two modules and fastssl/config.py, one of the modules that read the config.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from loaders.images import class_names
from loaders.sources import resolve_image_folder

from . import dist
from .checkpoint import latest_checkpoint
from .config import ConfigError
from .metrics import notice
from .models import build_feature_eval_model, build_model, build_trunk, check_head_inputs, fit_head_to_trunk
from .models.model import SSLModel
from .run_data import data_source, recipe, synthetic_params, test_transform
from .weights import load_initial_weights


def _regnet_params(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.MODEL.TRUNK.REGNET).items() if v is not None}


def feature_eval(cfg: DictConfig) -> bool:
    """Whether the model is the feature-evaluation model (MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON): a frozen
    trunk's pooled layers, one head each (fastssl/models/feature_eval.py)."""
    settings = cfg.MODEL.FEATURE_EVAL_SETTINGS
    if settings.EVAL_MODE_ON and not settings.FREEZE_TRUNK_ONLY:
        raise ConfigError("config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON needs FREEZE_TRUNK_ONLY=True: fastssl "
                          "evaluates a frozen trunk (no fine-tuning, no frozen heads)")
    return bool(settings.EVAL_MODE_ON)


def resolve_head_params(cfg: DictConfig, *, quiet: bool = False) -> list:
    """MODEL.HEAD.PARAMS fitted to the run: the first head's input follows the trunk's feature_dim, and
    the last head's output follows LOSS.<name>.memory_params.embedding_dim where the loss sets one
    (the DeepClusterV2 page changes the projection with that key). A notice says what changed.
    Feature-evaluation heads are taken as given: each reads its own layer (check_feature_eval)."""
    if feature_eval(cfg):
        return OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS)
    trunk = cfg.MODEL.TRUNK
    with torch.device("meta"):
        feature_dim = build_trunk(trunk.NAME, resnet=OmegaConf.to_container(trunk.RESNETS),
                                  regnet=_regnet_params(cfg)).feature_dim
    head_params, changed = fit_head_to_trunk(OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS), feature_dim)
    if changed and not quiet:
        notice(f"MODEL.HEAD.PARAMS[0] dims[0] set to the trunk's feature_dim {feature_dim}")
    loss = cfg.LOSS.get(cfg.LOSS.name) or {}
    embedding_dim = (loss.get("memory_params") or {}).get("embedding_dim")
    if embedding_dim is not None and head_params and head_params[-1][1]["dims"][-1] != embedding_dim:
        name, kwargs = head_params[-1]
        head_params = [*head_params[:-1], [name, {**kwargs, "dims": [*kwargs["dims"][:-1], embedding_dim]}]]
        if not quiet:
            notice(f"MODEL.HEAD.PARAMS[-1] output dim set to LOSS.{cfg.LOSS.name}.memory_params.embedding_dim "
                   f"{embedding_dim}")
    return head_params


def build_run_model(cfg: DictConfig, *, head_params: list, on_meta: bool = False) -> SSLModel:
    """MODEL.TRUNK + the resolved heads, on the meta device when asked (for checks of huge models)."""
    trunk = cfg.MODEL.TRUNK
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        if feature_eval(cfg):
            settings = cfg.MODEL.FEATURE_EVAL_SETTINGS
            return build_feature_eval_model(
                trunk_name=trunk.NAME, resnet=OmegaConf.to_container(trunk.RESNETS), regnet=_regnet_params(cfg),
                alexnet=None, head_params=head_params, flatten=settings.SHOULD_FLATTEN_FEATS,
                feature_pool_ops=OmegaConf.to_container(settings.LINEAR_EVAL_FEAT_POOL_OPS_MAP),
                channels_last=cfg.MODEL.CHANNELS_LAST)
        return build_model(trunk_name=trunk.NAME, resnet=OmegaConf.to_container(trunk.RESNETS),
                           regnet=_regnet_params(cfg), alexnet=None, head_params=head_params,
                           channels_last=cfg.MODEL.CHANNELS_LAST)

def check_feature_eval(cfg: DictConfig, *, head_params: list) -> None:
    """Every feature-evaluation head fits its pooled layer at the training and the test crop size (a model
    on the meta device runs the shapes: a one-line error before anything is loaded)."""
    model = build_run_model(cfg, head_params=head_params, on_meta=True)
    pool_ops = OmegaConf.to_container(cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP)
    sizes = {recipe(cfg).size_crops[0]} | ({test_transform(cfg)["image_size"]} if cfg.TEST_MODEL else set())
    for size in sorted(sizes):
        check_head_inputs(model, image_size=size, feature_pool_ops=pool_ops)


def training_classes(cfg: DictConfig) -> tuple[Path, int]:
    """(the training image folder, its number of classes) of DATA.TRAIN (synthetic or disk_folder)."""
    source, train_path = data_source(cfg)
    folder = resolve_image_folder(source=source, data_path=train_path, split="train",
                                  synthetic_params=synthetic_params(cfg))
    return folder, len(class_names(folder))


def check_num_classes(cfg: DictConfig, *, head_params: list) -> None:
    """Every classifier has an output per class of the training folder: a label past the last output fails in
    the cross-entropy (on a GPU as a device-side assert), so it is a one-line error here."""
    if data_source(cfg)[0] == "ffcv":  # a .beton's classes are not listed without reading it
        return
    folder, num_classes = training_classes(cfg)
    for index, (name, kwargs) in enumerate(head_params):
        if kwargs["dims"][-1] < num_classes:
            raise ConfigError(f"config.MODEL.HEAD.PARAMS[{index}] ({name}) has {kwargs['dims'][-1]} outputs for the "
                              f"{num_classes} classes of {folder}")


LINEAR_EVAL_CONFIGS = {"synthetic": "benchmark/linear_image_classification/synthetic/eval_resnet18_1node_cpu_linear",
                       "fashion_mnist": "benchmark/linear_image_classification/synthetic/eval_resnet18_1node_cpu_linear",
                       "disk_folder": "benchmark/linear_image_classification/imagenet1k/byol_transfer_in1k_linear"}


def linear_eval_arguments(cfg: DictConfig, *, weights_file: str | None, output_dir: str,
                          test_path: str | None) -> list[str]:
    """fastssl-train's arguments for a linear evaluation of the trunk of the run whose config is ``cfg`` (a
    checkpoint's): LINEAR_EVAL_CONFIGS' protocol for its data source on one process, its trunk (initialised
    from ``weights_file``; None: random) and its training data, one eval_mlp classifier on the trunk's pooled
    output over the classes of its training folder, tested on the built-in held-out split or ``test_path``."""
    source, train_path = data_source(cfg)
    if source not in LINEAR_EVAL_CONFIGS:
        raise ConfigError(f"linear evaluation reads image folders; the run's source is {source}")
    if source == "disk_folder" and not test_path:
        raise ConfigError("the run trained on an image folder: give the held-out image folder (--val-path)")
    trunk = cfg.MODEL.TRUNK
    with torch.device("meta"):
        feature_dim = build_trunk(trunk.NAME, resnet=OmegaConf.to_container(trunk.RESNETS),
                                  regnet=_regnet_params(cfg)).feature_dim
    head = [["eval_mlp", {"in_channels": feature_dim, "dims": [feature_dim, training_classes(cfg)[1]]}]]
    values = {"MODEL.TRUNK.NAME": trunk.NAME, "MODEL.TRUNK.RESNETS": OmegaConf.to_container(trunk.RESNETS),
              "MODEL.TRUNK.REGNET": OmegaConf.to_container(trunk.REGNET), "MODEL.HEAD.PARAMS": head,
              "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP": [],
              "MODEL.WEIGHTS_INIT.PARAMS_FILE": weights_file or "", "DATA.TRAIN.DATA_SOURCES": [source],
              "DATA.TRAIN.DATA_PATHS": [train_path] if train_path else [],
              "DATA.TRAIN.SYNTHETIC": OmegaConf.to_container(cfg.DATA.TRAIN.SYNTHETIC),
              "DATA.TRAIN.FASHION_MNIST": OmegaConf.to_container(cfg.DATA.TRAIN.FASHION_MNIST),
              "DATA.TEST.DATA_SOURCES": ["disk_folder" if test_path else source],  # a given folder, whatever the source
              "DATA.TEST.DATA_PATHS": [test_path] if test_path else [],
              "DISTRIBUTED.NUM_NODES": 1, "DISTRIBUTED.NUM_PROC_PER_NODE": 1, "CHECKPOINT.DIR": output_dir}
    return [f"config={LINEAR_EVAL_CONFIGS[source]}"] + [f"config.{key}={json.dumps(value)}"
                                                        for key, value in values.items()]


def frozen_parameters(cfg: DictConfig, model: torch.nn.Module) -> list:
    """MODEL.TEMP_FROZEN_PARAMS_ITER_MAP -> [([param], until_step)]; VISSL's names are accepted."""
    named = dict(model.named_parameters())
    frozen = []
    for name, iterations in OmegaConf.to_container(cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP):
        ours = re.sub(r"prototypes(\d+)", r"prototypes.\1", re.sub(r"^(module\.)", "", name))
        if ours not in named:
            raise ConfigError(f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP names {name!r}, which is not a parameter "
                              f"of this model (e.g. {next(iter(named))!r})")
        frozen.append(([named[ours]], int(iterations)))
    return frozen



def weights_init_options(cfg: DictConfig) -> dict:
    """MODEL.WEIGHTS_INIT as weights.load_initial_weights' keyword arguments. The weights initialise the
    model as it is built; a resumed run then restores its own checkpoint over them. A feature evaluation
    loads the trunk only (VISSL's should_init_head_weights): its heads are new classifiers."""
    init = cfg.MODEL.WEIGHTS_INIT
    params_file = init.PARAMS_FILE
    if params_file and Path(params_file).is_dir():  # a fastssl run directory: its latest checkpoint
        latest = latest_checkpoint(params_file)
        if latest is None:
            raise ConfigError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {params_file} is a directory without "
                              "checkpoint_step*.torch")
        params_file = str(latest)
    skip_layers = list(init.SKIP_LAYERS or []) + (["heads."] if feature_eval(cfg) else [])
    return {"params_file": params_file, "state_dict_key_name": init.STATE_DICT_KEY_NAME,
            "skip_layers": skip_layers, "remove_prefix": init.REMOVE_PREFIX, "append_prefix": init.APPEND_PREFIX}


def build_model_for_rank(cfg: DictConfig, *, head_params: list, info: dist.DistInfo,
                         device: torch.device) -> SSLModel:
    """The model, its initial weights (MODEL.WEIGHTS_INIT) loaded, with SyncBatchNorm over
    MODEL.SYNC_BN_CONFIG's groups where asked, then on the device (the wrapping order of byol.txt
    point 6: SyncBN conversion, device, autocast (the loop's), DDP (build_run))."""
    model = build_run_model(cfg, head_params=head_params)
    if cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE:
        report = load_initial_weights(model, **weights_init_options(cfg))
        notice(report.summary())
        if feature_eval(cfg) and report.missing:
            raise ConfigError(f"the frozen trunk would keep {len(report.missing)} random tensors that "
                              f"{cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE} lacks (e.g. {report.missing[0]})")
    elif feature_eval(cfg):
        notice("no MODEL.WEIGHTS_INIT.PARAMS_FILE: the frozen trunk keeps its random initialisation (a baseline)")
    sync_bn = cfg.MODEL.SYNC_BN_CONFIG
    if sync_bn.CONVERT_BN_TO_SYNC_BN and sync_bn.SYNC_BN_TYPE == "apex":
        notice("SYNC_BN_TYPE apex is mapped to torch.nn.SyncBatchNorm")
    if sync_bn.CONVERT_BN_TO_SYNC_BN and info.world_size > 1:  # on one process SyncBN is plain BN
        bn_group = dist.sync_bn_process_group(rank=info.rank, world_size=info.world_size,
                                              local_world_size=info.local_world_size, group_size=sync_bn.GROUP_SIZE)
        model = dist.convert_sync_batchnorm(model, process_group=bn_group, device=device)
    if feature_eval(cfg):  # after the SyncBN conversion; the optimizer takes parameters with requires_grad only
        model.trunk.requires_grad_(False)
    return model.to(device)
