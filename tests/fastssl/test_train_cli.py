"""End to end through the CLI entry point, CPU-sized: seed command lines, resume, NaN, bad keys."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastssl.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.config import compose_config
from fastssl.run_model import build_run_model, resolve_head_params
from fastssl.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DATA.TRAIN.DATA_LIMIT=16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1",
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[module.heads.0.prototypes0.weight, 1]]",
        "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 3, size_crops: [32, 16], "
        "num_crops: [2, 1], crop_scales: [[0.3, 1], [0.1, 0.3]]}, {name: RandomHorizontalFlip, p: 0.5}, "
        "{name: ImgPilColorDistortion, strength: 0.5}, {name: ToTensor}, "
        "{name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]"]
CPU = ["config=pretrain/swav/swav_1node_cpu_resnet18"] + TINY

SEED_COMMANDS = [
    [],
    ["config.LOSS.swav_loss.temperature=0.2", "config.LOSS.swav_loss.epsilon=0.04"],
    ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101"],
    ["config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101",
     "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2"],
    ["config.MODEL.TRUNK.NAME=regnet", "config.MODEL.TRUNK.REGNET.name=regnet_y_400mf"],
    ["config.MODEL.TRUNK.NAME=regnet", "config.MODEL.TRUNK.REGNET.depth=27", "config.MODEL.TRUNK.REGNET.w_0=640",
     "config.MODEL.TRUNK.REGNET.w_a=230.83", "config.MODEL.TRUNK.REGNET.w_m=2.53",
     "config.MODEL.TRUNK.REGNET.group_width=373",
     'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [10444, 10444, 128], "use_bn": False, "num_clusters": [3000]}]]'],
    ["+config/pretrain/swav/transforms=multicrop_2x224_4x96"],
    ["config.OPTIMIZER.num_epochs=100"],
    ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1"],
    ["config.DISTRIBUTED.NUM_PROC_PER_NODE=8", "config.DISTRIBUTED.NUM_NODES=4"],
]


@pytest.mark.parametrize("overrides", SEED_COMMANDS, ids=lambda o: " ".join(o)[:60] or "default")
def test_seed_command_lines_compose_and_build(overrides):
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet"] + overrides)
    model = build_run_model(cfg, head_params=resolve_head_params(cfg), on_meta=True)
    assert model.heads[0].prototypes[0].weight.shape[0] == cfg.MODEL.HEAD.PARAMS[0][1].num_clusters[0]
    assert model.heads[0].prototypes[0].weight.is_meta


def read_metrics(directory):
    with open(Path(directory) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_cpu_config_runs_two_steps_and_checkpoints(tmp_path):
    assert main(CPU + [f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.num_epochs=1"]) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in records)
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    assert saved["step"] == 2 and saved["epoch"] == 1 and "queue" in saved["method"]


def test_resume_continues_exactly(tmp_path):
    """A run restarted from its epoch-1 checkpoint continues with the same losses and ends with the same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = CPU + ["config.OPTIMIZER.num_epochs=2", "config.LOSS.swav_loss.queue.queue_length=16"]
    assert main(common + [f"config.CHECKPOINT.DIR={straight}"]) == 0
    a = read_metrics(straight)
    assert [r["step"] for r in a] == [0, 1, 2, 3]
    first = sorted(straight.glob("checkpoint_step*.torch"))[0]
    assert load_checkpoint(first)["step"] == 2
    resumed.mkdir()
    (resumed / first.name).write_bytes(first.read_bytes())  # as if the run had been killed after epoch 0
    assert main(common + [f"config.CHECKPOINT.DIR={resumed}"]) == 0
    c = read_metrics(resumed)
    assert [r["step"] for r in c] == [2, 3]
    assert [r["loss"] for r in c] == [r["loss"] for r in a[2:]]
    final_a = load_checkpoint(latest_checkpoint(straight))
    final_c = load_checkpoint(latest_checkpoint(resumed))
    assert all(torch.equal(final_a["model"][k], final_c["model"][k]) for k in final_a["model"])
    assert torch.equal(final_a["method"]["queue"], final_c["method"]["queue"])


def test_nan_loss_stops_with_a_dump(tmp_path, capsys):
    code = main(CPU + [f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.num_epochs=1",
                       "config.LOSS.swav_loss.temperature=1e-30"])  # in range, but the logits overflow
    assert code == 3
    dumps = list(tmp_path.glob("nan_dump_rank0_step*.torch"))
    assert len(dumps) == 1
    dump = torch.load(dumps[0], weights_only=False)
    assert not torch.isfinite(dump["loss"]) and len(dump["crops"]) == 3 and "scores0" in dump["method"]
    assert dump["outputs"] is not None  # the step's outputs, kept by the method's training_loss
    assert latest_checkpoint(tmp_path) is None  # nothing non-finite was saved as a checkpoint
    assert "no checkpoint was saved before it" in capsys.readouterr().err  # and none is promised


def test_misspelt_key_is_a_one_line_error_from_the_console_script():
    result = subprocess.run([sys.executable, "-m", "fastssl.train", "config=pretrain/swav/swav_8node_resnet",
                             "config.LOSS.swav_loss.temprature=0.2"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fastssl-train: error: unknown config key config.LOSS.swav_loss.temprature; "
        "did you mean config.LOSS.swav_loss.temperature?"]


@pytest.mark.slow
def test_full_8node_recipe_two_steps_on_cpu(tmp_path):
    """The issue's command: the full 8-node recipe (ResNet-50, 2x224+6x96) for two steps on a CPU."""
    code = main(["config=pretrain/swav/swav_8node_resnet", "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
                 "config.DATA.TRAIN.DATA_LIMIT=8", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
                 "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.OPTIMIZER.num_epochs=1",
                 "config.DATA.NUM_DATALOADER_WORKERS=0", f"config.CHECKPOINT.DIR={tmp_path}"])
    assert code == 0
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == 1


@pytest.mark.slow
def test_demo_beats_a_random_trunk(tmp_path, capsys):
    """The main job, whole (about four minutes): `make demo`'s two commands, and the learned trunk's
    kNN beats both random baselines by a clear margin (measured: 62.8% vs 55.4% / 54.8%)."""
    from fastssl.evaluate import main as evaluate
    assert main(["config=pretrain/swav/swav_1node_cpu_resnet18", f"config.CHECKPOINT.DIR={tmp_path}",
                 "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]) == 0
    capsys.readouterr()
    assert evaluate(["knn", "--checkpoint", str(tmp_path), "--baselines"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"]
    assert report["trained"] > max(report["random_bn_init"], report["random_bn_reestimated"]) + 5


def test_sigterm_during_set_up_ends_the_run_at_once_and_leaves_no_staging_folder(tmp_path):
    """issue 23: before the first step SIGTERM was only recorded, so a run generating its data (or building a
    large model) went on for minutes and needed SIGKILL. Now it ends at once, 128 + 15, with one line."""
    import os
    import signal
    import time

    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "fastssl.train", *CPU, "config.MACHINE.DEVICE=cpu",
               "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=3000", "config.DATA.TRAIN.DATA_LIMIT=-1",
               f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "FASTSSL_CACHE": str(cache)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600  # a loaded 2-core machine took minutes to start the generation
    try:
        while not list(cache.glob(".synthetic-*.tmp-*/train/*/*.jpg")):
            assert process.poll() is None and time.monotonic() < deadline, "the generation never started"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)  # as SLURM and torchrun signal a job: its whole process group
        _, stderr = process.communicate(timeout=300)  # the exit itself can take a while on a loaded machine
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == ("fastssl-train: stopped by SIGTERM during set-up, before the first "
                                                "step: nothing was trained and no checkpoint written"), stderr
    assert "Traceback" not in stderr
    assert [p.name for p in cache.iterdir()] == []  # the staging folder went with the run
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_checkpoint_dir_that_cannot_hold_checkpoints_is_one_line_before_any_data_is_built(tmp_path, monkeypatch,
                                                                                            capsys):
    from fastssl.checkpoint import CheckpointError, check_checkpoint_directory
    with pytest.raises(CheckpointError, match="is the root of the filesystem"):
        check_checkpoint_directory("/")  # here, not through a run: a build without the check would write in /
    monkeypatch.setenv("FASTSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "a_file").write_text("mine")
    for directory, text in ((tmp_path / "a_file", "is a file, not a folder"),
                            (tmp_path / "a_file" / "run", "cannot hold checkpoints: Not a directory"),
                            (tmp_path / "home", "is your home directory"),
                            (tmp_path / ("x" * 300), "is too long"),
                            (tmp_path / "/".join(["deep" * 60] * 20), "is too long"),
                            ("/proc/fastssl-run", "cannot hold checkpoints")):
        assert main(CPU + [f"config.CHECKPOINT.DIR={directory}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastssl-train: error: config.CHECKPOINT.DIR") and text in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # checked before the built-in dataset was generated
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_checkpoint_dir_holding_files_fastssl_did_not_write_is_said():
    from fastssl.checkpoint import check_checkpoint_directory
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        for name in ("checkpoint_step00000003.torch", "metrics.jsonl", "tensorboard", ".hydra", "sweep_job.json"):
            (Path(directory) / name).touch()
        assert check_checkpoint_directory(directory) is None
        (Path(directory) / "thesis.tex").touch()
        assert "holds 1 file(s) fastssl did not write (such as 'thesis.tex')" in check_checkpoint_directory(directory)
