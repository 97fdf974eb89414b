"""The CPU-sized configs (the demo above all) resolve to the values they had when fastssl's defaults were
still its own (commit f453f29, before the defaults became VISSL's): every key they use, in
cpu_configs_resolved.yaml. A change of defaults.yaml that would change how one of them trains fails here;
state the old value in the config instead.

Deliberate changes since: the demo (swav_1node_cpu_resnet18) dropped its Gaussian blur when the blur
became PIL's exact one (benchmarks/RESULTS.md).

Regenerate (only for a deliberate change of a CPU config):
    python tests/fastssl/test_cpu_configs_unchanged.py > tests/fastssl/cpu_configs_resolved.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fastssl.config import compose_config

SNAPSHOT = Path(__file__).with_name("cpu_configs_resolved.yaml")
CPU_CONFIGS = ["pretrain/swav/swav_1node_cpu_resnet18", "pretrain/deepcluster_v2/deepclusterv2_1node_cpu_resnet18",
               "pretrain/npid/npid_1node_cpu_resnet18"]
# Keys the entry point fills from the run (the head, the transforms, the dataset), not from the config.
INFERRED = {"LOSS.swav_loss.embedding_dim", "LOSS.swav_loss.num_crops", "LOSS.swav_loss.num_prototypes",
            "LOSS.swav_loss.output_dir", "LOSS.swav_loss.queue.local_queue_length",
            "LOSS.deepclusterv2_loss.DROP_LAST", "LOSS.deepclusterv2_loss.BATCHSIZE_PER_REPLICA",
            "LOSS.deepclusterv2_loss.num_crops", "LOSS.deepclusterv2_loss.num_train_samples",
            "LOSS.nce_loss_with_memory.num_train_samples"}
# The keys each LR schedule reads (besides auto_lr_scaling and update_interval).
SCHEDULE_KEYS = {"constant": {"value"}, "linear": {"start_value", "end_value"},
                 "cosine": {"start_value", "end_value"}, "multistep": {"values", "milestones"},
                 "composite": {"schedulers", "lengths", "interval_scaling"}}


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat = {}
    for key, child in node.items():
        flat.update(_flatten(child, f"{prefix}{key}."))
    return flat


def used_keys(config: dict) -> dict:
    """The resolved config as {dotted key: value}, without the keys the run does not read: inferred
    keys, other losses' groups, other loader backends' groups, the LR keys of other schedule kinds."""
    flat = _flatten(config)
    loss, loader = config["LOSS"]["name"], config["DATA"]["TRAIN"]["LOADER"]
    lr = config["OPTIMIZER"]["param_schedulers"]["lr"]
    unread_lr = set().union(*SCHEDULE_KEYS.values()) - SCHEDULE_KEYS[lr["name"]]

    def read(key: str) -> bool:
        parts = key.split(".")
        if key in INFERRED:
            return False
        if parts[0] == "LOSS" and len(parts) > 2 and parts[1] != loss:
            return False
        if parts[:2] == ["DATA", "TRAIN"] and parts[2] in ("DALI", "FFCV") and parts[2].lower() != loader:
            return False
        return not (parts[:3] == ["OPTIMIZER", "param_schedulers", "lr"] and parts[3] in unread_lr)

    return {key: value for key, value in flat.items() if read(key)}


def resolved(name: str) -> dict:
    return used_keys(OmegaConf.to_container(compose_config([f"config={name}"])))


@pytest.mark.parametrize("name", CPU_CONFIGS, ids=lambda name: name.rsplit("/", 1)[-1])
def test_cpu_config_resolves_as_before(name):
    before = yaml.safe_load(SNAPSHOT.read_text())[name]
    now = resolved(name)
    changed = {key: (value, now.get(key, "<missing>")) for key, value in before.items() if now.get(key) != value}
    assert not changed, f"{name}: (before, now) = {changed}"


if __name__ == "__main__":
    yaml.safe_dump({name: resolved(name) for name in CPU_CONFIGS}, sys.stdout, sort_keys=True, width=120)
