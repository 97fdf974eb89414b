"""Checkpoints under faults: damaged files fall back to the newest readable one, another model's checkpoint
is a one-line error naming the difference, files are read without running code, a full disk leaves the
previous checkpoint intact and no temporary file behind."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastssl.checkpoint import (CheckpointError, TrainingCheckpoint, TrainState, list_checkpoints, load_checkpoint,
                                save_checkpoint)
from fastssl.dist import sync_bn_rank_groups
from fastssl.methods.base import Method


def run_objects(directory, *, width=4, config_depth=18):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = {"MODEL": {"TRUNK": {"NAME": "resnet", "RESNETS": {"DEPTH": config_depth}}, "HEAD": {"PARAMS": []}}}
    return TrainingCheckpoint(directory=directory, rank=0, model=model, optimizer=optimizer, scaler=None,
                              method=Method(), extra_state={"config": config})


def two_checkpoints(directory):
    checkpoint = run_objects(directory)
    checkpoint.save(TrainState(step=1, epoch=1))
    with torch.no_grad():
        checkpoint.model[0].weight.add_(1.0)
    checkpoint.save(TrainState(step=2, epoch=2))
    return list_checkpoints(directory)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capfd):
    older, latest = two_checkpoints(tmp_path)
    data = latest.read_bytes()
    latest.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random bytes": os.urandom(4096)}[damage])
    fresh = run_objects(tmp_path)
    state, path = fresh.restore_latest(map_location="cpu")
    assert path == older and state.step == 1
    assert torch.equal(fresh.model[0].weight, load_checkpoint(older)["model"]["0.weight"])
    warning = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and latest.name in warning[0]


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path):
    for path in two_checkpoints(tmp_path):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as error:
        run_objects(tmp_path).restore_latest(map_location="cpu")
    assert "\n" not in str(error.value)


def test_another_models_checkpoint_is_a_one_line_error_naming_the_difference(tmp_path):
    two_checkpoints(tmp_path)
    other = run_objects(tmp_path, width=8, config_depth=50)
    with pytest.raises(CheckpointError, match=r"MODEL\.TRUNK\.RESNETS\.DEPTH is 18 there, 50 here"):
        other.restore_latest(map_location="cpu")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "step": 3, "payload": RunsCode()}, tmp_path / "checkpoint_step00000003.torch")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "checkpoint_step00000003.torch")
    assert not (tmp_path / "ran-code").exists()


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    # A real write failure: the file-size limit of a child process is below the second checkpoint's size.
    save_checkpoint(tmp_path, {"weights": torch.zeros(10)}, step=1)
    script = (
        "import resource, signal, sys, torch\n"
        "from fastssl.checkpoint import CheckpointError, save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        f"    save_checkpoint({str(tmp_path)!r}, {{'weights': torch.zeros(1_000_000)}}, step=2)\n"
        "except CheckpointError as error:\n"
        "    print(error); sys.exit(7)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 7, result.stderr
    assert "cannot write checkpoint" in result.stdout and "previous checkpoints are intact" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step00000001.torch"]
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint_step00000001.torch")["weights"], torch.zeros(10))


def test_a_sync_bn_group_larger_than_the_world_is_the_whole_world(capfd):
    # swav_8node_resnet (GROUP_SIZE 8) run on 2 processes: VISSL's pages vary the number of GPUs with one key.
    assert sync_bn_rank_groups(world_size=2, local_world_size=2, group_size=8) == [[0, 1]]
    assert "larger than the 2 processes" in capfd.readouterr().err
    with pytest.raises(ValueError, match="do not divide"):
        sync_bn_rank_groups(world_size=6, local_world_size=6, group_size=4)
