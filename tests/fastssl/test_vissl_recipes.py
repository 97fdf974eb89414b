"""fastssl's recipes against VISSL's own files (facebookresearch/vissl at commit 09270ed2): each test pins
the value VISSL's file gives, named beside it, so a drift from VISSL is a failing test, not a surprise."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fastssl.config import compose_config
from fastssl.optim import precompute_schedule, scale_lr_schedule
from fastssl.builder import build_method, derive, run_info
from fastssl.run_model import resolve_head_params
from fastssl.train import main

IMAGENET = 1281167


def lr_schedule(argv, *, world_size, iterations_per_epoch=100):
    cfg = compose_config(argv)
    derived = derive(cfg, world_size=world_size, num_samples=IMAGENET, iterations_per_epoch=iterations_per_epoch)
    return derived.lr_schedule


# ---- defaults (issue 10, item 6) -----------------------------------------------------------------

def test_defaults_are_vissls():
    """vissl/config/defaults.yaml: DATA.TRAIN.DROP_LAST False, OPTIMIZER.num_epochs 90, regularize_bn False,
    regularize_bias True, lr: multistep per epoch, values [0.1, 0.01, 0.001] at milestones [30, 60],
    auto_lr_scaling off (base 0.1 per 256 images, scaling_type linear)."""
    cfg = compose_config([])
    assert cfg.DATA.TRAIN.DROP_LAST is False
    assert cfg.OPTIMIZER.num_epochs == 90
    assert cfg.OPTIMIZER.regularize_bn is False and cfg.OPTIMIZER.regularize_bias is True
    lr = cfg.OPTIMIZER.param_schedulers.lr
    assert (lr.name, lr.update_interval) == ("multistep", "epoch")
    assert list(lr["values"]) == [0.1, 0.01, 0.001] and list(lr.milestones) == [30, 60]
    assert lr.auto_lr_scaling.auto_scale is False
    assert (lr.auto_lr_scaling.base_value, lr.auto_lr_scaling.base_lr_batch_size) == (0.1, 256)
    schedule = lr_schedule([], world_size=1, iterations_per_epoch=10)
    assert len(schedule) == 90 * 10
    assert schedule[[0, 299, 300, 599, 600, 899]] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("config", ["pretrain/npid/npid_8gpu_resnet", "pretrain/npid/npid++_4nodes_resnet"])
def test_npid_seeds_keep_the_last_incomplete_batch(config):
    """VISSL's npid_8gpu_resnet.yaml and npid++_4nodes_resnet.yaml leave DROP_LAST at its default, False."""
    assert compose_config([f"config={config}"]).DATA.TRAIN.DROP_LAST is False


def test_npid_seed_trains_through_a_short_last_batch(tmp_path):
    """With DROP_LAST False, 12 samples in batches of 8 give a batch of 8 and one of 4 per epoch."""
    argv = ["config=pretrain/npid/npid_8gpu_resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=18",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.BACKEND=gloo",
            "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
            "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
            "config.DATA.TRAIN.DATA_LIMIT=12", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
            "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 16}, {name: ToTensor}]",
            "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
            "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1",
            "config.OPTIMIZER.num_epochs=1", f"config.CHECKPOINT.DIR={tmp_path}"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and all(math.isfinite(r["loss"]) for r in records)


# ---- recipe values (items 2, 3, 4) -----------------------------------------------------------------

def test_deepclusterv2_recipe_is_100_epochs_with_10_warmup_epochs():
    """VISSL's deepclusterv2_2crops_resnet.yaml: num_epochs 100, lengths [0.1, 0.9], linear then cosine to 0,
    0.3 per 256 images (4.8 at 4,096), the warm-up from one node's LR (0.3 * 512 / 256 = 0.6)."""
    config = "config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
    cfg = compose_config([config])
    assert cfg.OPTIMIZER.num_epochs == 100 and list(cfg.OPTIMIZER.param_schedulers.lr.lengths) == [0.1, 0.9]
    iterations = IMAGENET // 4096
    lr = lr_schedule([config], world_size=64, iterations_per_epoch=iterations)
    warmup = 10 * iterations
    assert len(lr) == 100 * iterations
    assert lr[0] == pytest.approx(0.6)
    assert lr[warmup // 2] == pytest.approx(0.6 + (4.8 - 0.6) * (warmup // 2) / (0.1 * len(lr)))
    assert lr[warmup] == pytest.approx(0.5 * 4.8 * (1 + math.cos(math.pi * warmup / len(lr))))
    assert lr.max() == pytest.approx(4.8, rel=1e-3) and lr[-1] == pytest.approx(0.0, abs=1e-5)


def test_swav_multicrop_2x224_crop_scale():
    """VISSL's configs/config/pretrain/swav/transforms/multicrop_2x224.yaml: crop_scales [[0.08, 1]]."""
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet", "+config/pretrain/swav/transforms=multicrop_2x224"])
    crop = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert [list(scale) for scale in crop.crop_scales] == [[0.08, 1]]
    assert (list(crop.size_crops), list(crop.num_crops), crop.total_num_crops) == ([224], [2], 2)


def test_npid_lr_is_scaled_to_the_global_batch():
    """VISSL's npid_8gpu_resnet.yaml: auto_scale true, base_value 0.03 per 256 images, multistep
    [0.03, 0.003, 0.0003] at epochs [120, 160]: 0.03 on 8 x 32 images, 0.06 on 16 x 32."""
    config = "config=pretrain/npid/npid_8gpu_resnet"
    scaling = compose_config([config]).OPTIMIZER.param_schedulers.lr.auto_lr_scaling
    assert (scaling.auto_scale, scaling.base_value, scaling.base_lr_batch_size) == (True, 0.03, 256)
    lr = lr_schedule([config], world_size=8, iterations_per_epoch=10)
    assert list(lr[[0, 1199, 1200, 1599, 1600, 1999]]) == [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003]
    lr = lr_schedule([config, "config.DISTRIBUTED.NUM_NODES=2"], world_size=16, iterations_per_epoch=10)
    assert list(lr[[0, 1200, 1600]]) == [0.06, 0.006, 0.0006]


def test_npid_plus_plus_lr_is_scaled_to_the_global_batch():
    """VISSL's npid++_4nodes_resnet.yaml: auto_scale true, base_value 0.03 per 256 images, cosine from
    0.12 to 0.00012 per epoch over 800 epochs: 0.12 on 4 nodes x 8 x 32 images."""
    config = "config=pretrain/npid/npid++_4nodes_resnet"
    lr = lr_schedule([config], world_size=32, iterations_per_epoch=10)
    epochs = np.array([0, 400, 799])
    assert len(lr) == 8000
    assert lr[epochs * 10 + 9] == pytest.approx(0.00012 + 0.5 * (0.12 - 0.00012) * (1 + np.cos(np.pi * epochs / 800)))
    lr = lr_schedule([config, "config.DISTRIBUTED.NUM_NODES=1"], world_size=8, iterations_per_epoch=10)
    assert lr[0] == pytest.approx(0.03)


# ---- LR scaling (item 9): vissl/utils/hydra_config.py -------------------------------------------------

def test_one_node_removes_the_warmup_and_the_cosine_runs_the_whole_run():
    """resolve_linear_schedule: on one node the warm-up would start at the scaled LR (0.3 * 512 / 256 = 0.6,
    its end), so VISSL deletes it and the composite becomes its cosine, from 0.6 to 0.0006 over all steps."""
    lr = lr_schedule(["config=pretrain/swav/swav_8node_resnet", "config.DISTRIBUTED.NUM_NODES=1"], world_size=8,
                     iterations_per_epoch=10)
    total = 4000
    steps = np.array([0, 1, 100, 2000, 3999])
    assert lr[steps] == pytest.approx(0.0006 + 0.5 * (0.6 - 0.0006) * (1 + np.cos(np.pi * steps / total)))


def test_several_nodes_keep_the_warmup():
    lr = lr_schedule(["config=pretrain/swav/swav_8node_resnet", "config.DISTRIBUTED.NUM_NODES=2"], world_size=16,
                     iterations_per_epoch=10)
    assert lr[0] == pytest.approx(0.6) and lr[50] == pytest.approx(0.6 + (1.2 - 0.6) * 50 / 100)  # 100 warm-up steps


def swav_composite():
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet"])
    spec = OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.lr)
    spec.pop("auto_lr_scaling"), spec.pop("update_interval")
    return spec


def test_sqrt_scaling():
    """infer_learning_rate with scaling_type sqrt: f = sqrt(global batch / base_lr_batch_size), so 8 nodes x 512
    images give 0.3 * sqrt(16) = 1.2; the warm-up still starts from 0.3 * 512 / 256 = 0.6 (linear, per node)."""
    spec = scale_lr_schedule(swav_composite(), base_value=0.3, base_lr_batch_size=256, global_batch=4096,
                             batch_per_node=512, scaling_type="sqrt")
    warmup, cosine = spec["schedulers"]
    assert (warmup["start_value"], warmup["end_value"]) == pytest.approx((0.6, 1.2))
    assert (cosine["start_value"], cosine["end_value"]) == pytest.approx((1.2, 0.0012))
    # One node of 8 x 64: f = sqrt(2), peak 0.42; the warm-up starts above it (0.6), so VISSL keeps it.
    spec = scale_lr_schedule(swav_composite(), base_value=0.3, base_lr_batch_size=256, global_batch=512,
                             batch_per_node=512, scaling_type="sqrt")
    assert spec["name"] == "composite" and spec["schedulers"][0]["start_value"] == pytest.approx(0.6)
    assert spec["schedulers"][1]["start_value"] == pytest.approx(0.3 * math.sqrt(2))
    lr = precompute_schedule(spec, total_steps=1000, steps_per_epoch=10, update_interval="step")
    assert lr[0] == pytest.approx(0.6) and lr[24] < lr[0]
    with pytest.raises(ValueError, match="scaling_type"):
        scale_lr_schedule(swav_composite(), base_value=0.3, base_lr_batch_size=256, global_batch=512,
                          batch_per_node=512, scaling_type="log")


def test_sqrt_scaling_through_the_entry_point():
    lr = lr_schedule(["config=pretrain/swav/swav_8node_resnet",
                      "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type=sqrt"], world_size=64)
    assert lr.max() == pytest.approx(1.2, rel=1e-3)


# ---- names (item 10) -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, sizes, numbers, scales", [
    ("multicrop_6crop_2x160_4x96", [160, 96], [2, 4], [[0.14, 1], [0.05, 0.14]]),
    ("multicrop_6crop_2x224_4x96", [224, 96], [2, 4], [[0.14, 1], [0.05, 0.14]]),
    ("multicrop_6crop_6x160", [160], [6], [[0.14, 1]]),
])
def test_vissls_swav_transform_groups_exist_under_their_names(name, sizes, numbers, scales):
    """VISSL's configs/config/pretrain/swav/transforms/<name>.yaml: 6 crops with these sizes and scales."""
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet", f"+config/pretrain/swav/transforms={name}"])
    crop = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert crop.total_num_crops == 6 and list(crop.size_crops) == sizes and list(crop.num_crops) == numbers
    assert [list(scale) for scale in crop.crop_scales] == scales


def test_swav_queue_length_is_rounded_down_to_whole_global_batches():
    """vissl/utils/hydra_config.py infer_losses_config: queue_length -= queue_length % global batch, and
    local_queue_length = queue_length // world size (defaults.yaml says rounded down, as it is)."""
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet", "config.LOSS.swav_loss.queue.queue_length=3840"])
    derived = derive(cfg, world_size=8, num_samples=IMAGENET, iterations_per_epoch=2502)
    swav = build_method(cfg, run_info(cfg, derived, rank=0, device=torch.device("cpu"),
                                      head_params=resolve_head_params(cfg)))
    assert swav.local_queue_length == 3584 // 8  # 3840 - 3840 % 512


# ---- NPID's transforms (issue 10, item 1) ----------------------------------------------------------

@pytest.mark.parametrize("config", ["pretrain/npid/npid_8gpu_resnet", "pretrain/npid/npid++_4nodes_resnet"])
def test_npid_transforms_are_vissls(config):
    """VISSL's npid_8gpu_resnet.yaml and npid++_4nodes_resnet.yaml: ColorJitter(brightness 0.4, contrast
    0.4, saturation 0.4, hue 0.4) first, on the whole image, then RandomResizedCrop 224,
    RandomHorizontalFlip (p 0.5), ToTensor, Normalize (ImageNet's): the jitter always applies, no
    grayscale, one jitter draw per image."""
    from loaders.recipe import recipe_from_transforms

    transforms = OmegaConf.to_container(compose_config([f"config={config}"]).DATA.TRAIN.TRANSFORMS)
    assert [t["name"] for t in transforms] == ["ColorJitter", "RandomResizedCrop", "RandomHorizontalFlip",
                                               "ToTensor", "Normalize"]
    recipe = recipe_from_transforms(transforms)
    assert recipe.colour_per_image and recipe.crop_sizes == [224] and recipe.crop_scales == ((0.08, 1.0),)
    (crop,) = recipe.augmentations
    assert crop.jitter_p == 1.0 and crop.gray_p == 0.0 and crop.flip_p == 0.5
    assert crop.brightness == crop.contrast == crop.saturation == pytest.approx((0.6, 1.4))
    assert crop.hue == pytest.approx((-0.4, 0.4))
    assert crop.blur_p == 0.0 and crop.solarize_p == 0.0
    assert recipe.mean == (0.485, 0.456, 0.406) and recipe.std == (0.229, 0.224, 0.225)
