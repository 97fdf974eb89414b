"""DeepClusterV2 and NPID through the entry point: every seed command line composes and builds, the
CPU-sized configs train end to end, and a resumed run continues exactly."""
import json
from pathlib import Path

import pytest
import torch

from fastssl.builder import build_method, derive, run_info
from fastssl.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.config import compose_config
from fastssl.run_model import build_run_model, resolve_head_params
from fastssl.train import main

IMAGENET_SAMPLES = 1281167

# The command lines of shared/seeds/deepclusterv2.rst and shared/seeds/npid.txt, as (config, overrides).
DC2 = "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"
NPID = "pretrain/npid/npid_8gpu_resnet"
SEED_COMMANDS = [
    (DC2, []),
    (DC2, ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"]),
    (DC2, ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101",
           "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2"]),
    (DC2, ["+config/pretrain/deepcluster_v2/transforms=multicrop_2x160_4x96"]),
    (DC2, ['config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 2048], "use_relu": True}], '
           '["mlp", {"dims": [2048, 2048], "use_relu": True}], ["mlp", {"dims": [2048, 128]}]]']),
    (DC2, ['config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 4096], "use_relu": True}], '
           '["mlp", {"dims": [4096, 128]}]]']),
    (DC2, ["config.OPTIMIZER.num_epochs=100"]),
    (DC2, ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1"]),
    (DC2, ["config.DISTRIBUTED.NUM_PROC_PER_NODE=8", "config.DISTRIBUTED.NUM_NODES=4"]),
    (NPID, []),
    ("pretrain/npid/npid++_4nodes_resnet", []),
    (NPID, ["config.LOSS.nce_loss_with_memory.temperature=0.05",
            "config.LOSS.nce_loss_with_memory.memory_params.momentum=0.99",
            "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=16000"]),
    (NPID, ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.TRUNK_PARAMS.RESNETS.DEPTH=101"]),
    (NPID, ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]),
    (NPID, ["config.DISTRIBUTED.NUM_PROC_PER_NODE=8", "config.DISTRIBUTED.NUM_NODES=4"]),
]


def build_on_meta(cfg):
    """The model and the method of a seed config on ImageNet-1k, on the meta device (no memory used)."""
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    steps = IMAGENET_SAMPLES // (world * batch)
    derived = derive(cfg, world_size=world, num_samples=IMAGENET_SAMPLES, iterations_per_epoch=steps)
    head_params = resolve_head_params(cfg)
    model = build_run_model(cfg, head_params=head_params, on_meta=True)
    return model, build_method(cfg, run_info(cfg, derived, rank=0, device=torch.device("meta"),
                                             head_params=head_params))


@pytest.mark.parametrize("config,overrides", SEED_COMMANDS, ids=lambda o: " ".join(o)[-60:] if isinstance(o, list)
                         else o.rsplit("/", 1)[-1])
def test_seed_command_lines_compose_and_build(config, overrides):
    cfg = compose_config([f"config={config}"] + overrides)
    model, method = build_on_meta(cfg)
    assert next(model.parameters()).is_meta
    if cfg.LOSS.name == "deepclusterv2_loss":
        params = cfg.LOSS.deepclusterv2_loss
        assert [c.shape[0] for c in method.centroids] == list(params.num_clusters) == [3000, 3000, 3000]
        assert method.num_crops == (6 if "transforms" in " ".join(overrides) else 2)
        assert method.memory.shape[0] == len(params.memory_params.crops_for_mb)
    else:
        params = cfg.LOSS.nce_loss_with_memory
        assert method.bank.shape == (IMAGENET_SAMPLES, 128)
        assert method.num_negatives == params.negative_sampling_params.num_negatives
        assert method.momentum == params.memory_params.momentum


def test_embedding_dim_override_sets_the_head_output():
    """The page's `memory_params.embedding_dim=256` example: the head's output follows the loss."""
    cfg = compose_config([f"config={DC2}", "config.LOSS.deepclusterv2_loss.temperature=0.2",
                          "config.LOSS.deepclusterv2_loss.memory_params.embedding_dim=256"])
    model, method = build_on_meta(cfg)
    assert method.memory.shape[-1] == 256
    assert [m for m in model.heads.modules() if isinstance(m, torch.nn.Linear)][-1].out_features == 256
    cfg = compose_config([f"config={DC2}", "config.LOSS.deepclusterv2_loss.memory_params.embedding_dim=256",
                          'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 2048, 256], "use_relu": True}]]'])
    assert build_on_meta(cfg)[1].memory.shape[-1] == 256


TINY = ["config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DATA.TRAIN.DATA_LIMIT=16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1",
        "config.OPTIMIZER.num_epochs=2"]
CPU_RUNS = {
    "deepclusterv2": ["config=pretrain/deepcluster_v2/deepclusterv2_1node_cpu_resnet18",
                      "config.LOSS.deepclusterv2_loss.num_clusters=[4, 3]",
                      "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 3, "
                      "size_crops: [16, 8], num_crops: [2, 1], crop_scales: [[0.3, 1], [0.1, 0.3]]}, "
                      "{name: ToTensor}]"],
    "npid": ["config=pretrain/npid/npid_1node_cpu_resnet18",
             "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
             "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 16}, {name: ToTensor}]",
             "config.DATA.TRAIN.DATA_LIMIT=8"],  # NPID has no epoch-level state: one step per epoch is enough
}


def read_metrics(directory):
    with open(Path(directory) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return f"config.DATA.TRAIN.SYNTHETIC.ROOT={tmp_path_factory.mktemp('synthetic')}"


@pytest.mark.parametrize("name", sorted(CPU_RUNS))
def test_cpu_config_trains_and_resumes_exactly(name, tmp_path, synthetic_root):
    command = TINY + CPU_RUNS[name] + [synthetic_root]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(command + [f"config.CHECKPOINT.DIR={straight}"]) == 0
    records = read_metrics(straight)
    steps_per_epoch = len(records) // 2
    assert [r["step"] for r in records] == list(range(2 * steps_per_epoch))
    assert all(r["loss"] > 0 for r in records)
    # Resume from the end of epoch 0: the 2-epoch run's own checkpoint, copied to a fresh directory.
    resumed.mkdir()
    first = sorted(straight.glob("checkpoint_step*.torch"))[0]
    assert load_checkpoint(first)["step"] == steps_per_epoch
    (resumed / first.name).write_bytes(first.read_bytes())
    assert main(command + [f"config.CHECKPOINT.DIR={resumed}"]) == 0
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == list(range(steps_per_epoch, 2 * steps_per_epoch))
    assert [r["loss"] for r in again] == [r["loss"] for r in records[steps_per_epoch:]]
    final_straight = load_checkpoint(latest_checkpoint(straight))
    final_resumed = load_checkpoint(latest_checkpoint(resumed))
    for part in ("model", "method"):
        a, b = final_straight[part], final_resumed[part]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a), part
    method = final_straight["method"]
    if name == "npid":
        assert method["norm_constant"] > 0 and method["bank"].shape == (8, 64)
    else:
        assert (method["assignments"] >= 0).all() and method["memory"].shape == (2, 16, 64)
