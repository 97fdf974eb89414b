"""fastssl-bench train, CPU-sized: the breakdown of fastssl's step adds up and sits beside a bare loop."""
import json

import pytest

from benchmarks.train_step import PARTS, main

TINY = ["config.MACHINE.DEVICE=cpu", "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32",
        "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4", "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2",
        "config.DATA.NUM_DATALOADER_WORKERS=0", "config.DATA.TRAIN.DATA_LIMIT=40",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 16}, {name: ToTensor}]"]


def test_breakdown_adds_up_and_the_json_line_has_the_figures(capsys):
    figures = main(["--config", "pretrain/npid/npid_1node_cpu_resnet18", "--warmup", "1", "--steps", "2", *TINY,
                    "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8"])
    parts = figures["breakdown_seconds"]
    assert all(parts[part] >= 0 for part in PARTS) and parts["forward"] > 0 and parts["backward"] > 0
    assert sum(parts[part] for part in PARTS) <= parts["total"] * 1.05  # the rest is the loop's bookkeeping
    assert figures["bare_seconds_per_step"] > 0 and figures["images_per_s"] == pytest.approx(
        8 / figures["seconds_per_step"])
    before, after = figures["bare_seconds_before_after"]  # the bare loop's halves around fastssl's loop
    assert min(before, after) <= figures["bare_seconds_per_step"] <= max(before, after)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["benchmark"] == "train" and record["figures"]["method"] == "nce_loss_with_memory"
    assert "loop_overhead" in record["figures"] and record["commit"]


def test_switches_runs_each_variant_beside_the_config_as_it_is(capsys):
    from benchmarks.switches import main as switches

    assert switches(["--config", "pretrain/npid/npid_1node_cpu_resnet18", "--warmup", "1", "--steps", "2",
                     "--no-defaults", "--variant", "channels_last=config.MODEL.CHANNELS_LAST=True",
                     "--variant", "no such backend=config.DATA.TRAIN.LOADER=nonexistent", *TINY,
                     "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    rows = {row["variant"]: row for row in record["rows"]}
    assert set(rows) == {"as configured", "channels_last", "no such backend"}
    assert rows["channels_last"]["images_per_s"] > 0 and rows["channels_last"]["overrides"] == [
        "config.MODEL.CHANNELS_LAST=True"]
    assert "error" in rows["no such backend"] and "cannot run here" in out
