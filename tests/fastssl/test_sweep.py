"""fastssl-train --help, --cfg job and -m sweeps (Hydra's basic launcher and real submitit_local), CPU-tiny."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from fastssl.cli import read_command
from fastssl.config import ConfigError
from fastssl.sweep import split_sweeps
from fastssl.train import main

SEED = "config=pretrain/swav/swav_1node_cpu_resnet18"
TINY = ["config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DATA.TRAIN.DATA_LIMIT=8", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1",
        "config.OPTIMIZER.num_epochs=1", "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
        "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 2, size_crops: [32], "
        "num_crops: [2], crop_scales: [[0.3, 1]]}, {name: ToTensor}]"]
EPSILONS = "config.LOSS.swav_loss.epsilon=0.03,0.05"
JOB_DIRS = ["config.LOSS.swav_loss.epsilon=0.03", "config.LOSS.swav_loss.epsilon=0.05"]


def tiny(tmp_path):
    return [SEED, *TINY, f"config.DATA.TRAIN.SYNTHETIC.ROOT={tmp_path / 'data'}"]


def read_summary(sweep_dir):
    return [json.loads(line) for line in (sweep_dir / "sweep.jsonl").read_text().splitlines()]


def test_help_lists_usage_seeds_groups_defaults_and_launchers(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fastssl-train config=SEED")
    for expected in ("pretrain/swav/swav_8node_resnet", "pretrain/byol/byol_1node_cpu_resnet18",
                     "+config/pretrain/swav/transforms=", "multicrop_2x224_4x96", "configs/defaults.yaml",
                     "hydra/launcher=submitit_slurm", "hydra.launcher.partition", "--cfg job", "-m, --multirun"):
        assert expected in text


def test_cfg_job_prints_config_and_derived_values_and_trains_nothing(tmp_path, capsys):
    checkpoints = tmp_path / "ckpt"
    argv = [SEED, "config.DATA.TRAIN.DATA_LIMIT=100", f"config.DATA.TRAIN.SYNTHETIC.ROOT={tmp_path / 'data'}",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
            "config.LOSS.swav_loss.queue.queue_length=100", f"config.CHECKPOINT.DIR={checkpoints}"]
    assert main([*argv, "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "config:\n" in out and "epsilon: 0.05" in out
    # 100 images / (16 x 2) = 3 iterations per epoch (DROP_LAST), 10 epochs; the queue rounds down to 96.
    assert "# training samples: 100 (built-in synthetic dataset" in out and "not generated" in out
    assert "# global batch: 32 (16 per replica x 2)" in out
    assert "# iterations: 3 per epoch, 30 in all" in out
    assert "# lr (scaled): start" in out and "peak" in out
    assert "# swav queue: 96 (48 per rank)" in out
    assert not checkpoints.exists() and not (tmp_path / "data").exists()  # no training, no dataset
    assert main([*argv, "--cfg=job", "config.LOSS.swav_loss.epsilom=0.1"]) == 2
    assert capsys.readouterr().err.strip() == ("fastssl-train: error: unknown config key "
                                               "config.LOSS.swav_loss.epsilom; did you mean "
                                               "config.LOSS.swav_loss.epsilon?")


def test_only_top_level_commas_make_a_sweep():
    fixed, swept = split_sweeps([SEED, "config.LOSS.swav_loss.epsilon=0.03,0.05",
                                 "config.DATA.TRAIN.TRANSFORMS=[{name: ToTensor}, {name: X, crop_scales: [0.14, 1]}]",
                                 "config.OPTIMIZER.num_epochs=range(1,3)",
                                 'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 64], "num_clusters": [3]}]]'])
    assert swept == ["config.LOSS.swav_loss.epsilon=0.03,0.05", "config.OPTIMIZER.num_epochs=range(1,3)"]
    assert len(fixed) == 3
    command = read_command(["-m", SEED, "hydra/launcher=submitit_local", "--knn"])
    assert command.multirun and command.knn and command.hydra_overrides == ["hydra/launcher=submitit_local"]
    with pytest.raises(ConfigError, match="unknown option '--bogus'"):
        read_command(["--bogus"])


def test_a_misspelt_key_in_a_sweep_fails_before_any_job(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    assert main(["-m", *tiny(tmp_path), "config.LOSS.swav_loss.epsilom=0.03,0.05",
                 f"hydra.sweep.dir={sweep_dir}"]) == 2
    assert "did you mean config.LOSS.swav_loss.epsilon?" in capsys.readouterr().err
    assert not sweep_dir.exists()


def test_basic_sweep_runs_two_jobs_in_their_directories_reports_and_resumes(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    argv = ["-m", *tiny(tmp_path), EPSILONS, f"hydra.sweep.dir={sweep_dir}", "--knn"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for job_dir in JOB_DIRS:
        assert (sweep_dir / job_dir / "checkpoint_step00000001.torch").exists()
        assert len((sweep_dir / job_dir / "metrics.jsonl").read_text().splitlines()) == 1
    records = read_summary(sweep_dir)
    assert [r["overrides"] for r in records] == [[d] for d in JOB_DIRS]
    assert [r["status"] for r in records] == [0, 0]
    assert all(r["final_loss"] > 0 and r["images_per_s"] > 0 and 0 <= r["knn_top1"] <= 100 for r in records)
    assert records[0]["final_loss"] != records[1]["final_loss"]  # the two epsilons trained differently
    assert "kNN top-1" in out and JOB_DIRS[1] in out and "2 job(s), 0 failed" in out
    # The same sweep again resumes each job from its checkpoint: nothing left to train, nothing logged.
    assert main(argv[:-1]) == 0
    assert "resuming from" in capsys.readouterr().err
    for job_dir in JOB_DIRS:
        assert len((sweep_dir / job_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_failed_job_does_not_stop_the_others_and_sets_the_exit_status(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    # 8 images make no full batch of 16: that job fails when it builds its loader; the next one trains.
    assert main(["-m", *tiny(tmp_path), "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16,8",
                 f"hydra.sweep.dir={sweep_dir}"]) == 1
    records = read_summary(sweep_dir)
    assert [r["status"] for r in records] == [2, 0]
    assert (sweep_dir / "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8" / "checkpoint_step00000001.torch").exists()
    assert "2 job(s), 1 failed" in capsys.readouterr().out


def test_submitit_local_sweep_runs_two_jobs_through_submitit(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    assert main([*tiny(tmp_path), EPSILONS, f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=submitit_local",
                 "hydra.launcher.timeout_min=10"]) == 0
    records = read_summary(sweep_dir)
    assert [r["status"] for r in records] == [0, 0]
    assert [r["overrides"] for r in records] == [[d] for d in JOB_DIRS]
    for job_dir in JOB_DIRS:
        assert (sweep_dir / job_dir / "checkpoint_step00000001.torch").exists()
    submitted = [p for p in (sweep_dir / ".submitit").iterdir() if p.name != "%j"]
    assert len(submitted) == 2  # one submitit job folder (its pickles and logs) per job
    assert all(any(p.glob("*_result.pkl")) for p in submitted)
    assert "2 job(s), 0 failed" in capsys.readouterr().out


def test_submitit_slurm_script_asks_for_distributed_nodes_tasks_gpus_and_usr1(tmp_path, monkeypatch):
    """The sbatch script submitit writes for a job: resources from DISTRIBUTED and the launcher keys, and
    SIGUSR1 before the time limit (fastssl's checkpoint-and-stop signal). A stand-in srun lets submitit's
    SLURM executor start here; nothing is submitted."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    import submitit

    from fastssl.run_data import launch_resources
    from fastssl.config import compose_config
    from fastssl.sweep import PRIMARY, launcher_defaults

    words = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
             "hydra.launcher.timeout_min=2880"]
    overrides = launcher_defaults(words, launch_resources(compose_config(["config=pretrain/swav/swav_8node_resnet"])))
    assert sorted(overrides) == ["hydra.launcher.gpus_per_node=8", "hydra.launcher.max_num_timeout=10",
                                 "hydra.launcher.nodes=8", "hydra.launcher.tasks_per_node=8"]
    ConfigStore.instance().store(name=PRIMARY, node={"hydra": {"sweep": {"dir": str(tmp_path)}}})
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path=None, job_name="fastssl"):
        params = instantiate(compose(PRIMARY, overrides=[*overrides, *words], return_hydra_config=True)
                             .hydra.launcher).params
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "%j")
    shared = {"timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "name"}
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout", "stderr_to_stdout",
                                               "cpus_per_task", "mem_gb") and v is not None})
    script = executor._executor._make_submission_file_text("python -m fastssl", "uid")
    for line in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
                 "--time=2880", "--signal=USR1@120"):
        assert f"#SBATCH {line}" in script


def test_a_job_stopped_short_of_its_last_step_hands_sigusr1_on_to_submitit(tmp_path):
    """fastssl's stop on a signal returns normally; under submitit the job then re-raises SIGUSR1 for
    submitit's handler (requeue) unless the last step's checkpoint is there."""
    from fastssl.sweep import requeue_if_stopped

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        argv = [*tiny(tmp_path), "config.DATA.TRAIN.DATA_LIMIT=16"]  # 16 images / 8 = 2 steps in all
        (tmp_path / "checkpoint_step00000001.torch").write_bytes(b"")
        requeue_if_stopped(argv, str(tmp_path))
        assert received == [signal.SIGUSR1]
        (tmp_path / "checkpoint_step00000002.torch").write_bytes(b"")
        requeue_if_stopped(argv, str(tmp_path))
        assert received == [signal.SIGUSR1]  # finished: nothing to requeue
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _submitit_job_pid(sweep_dir: Path) -> int | None:
    """The pid of this test's own submitit job process (its command line names the sweep directory)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and "submitit.core._submit" in cmdline and str(sweep_dir) in cmdline:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_submitit_local_job_preempted_by_sigusr1_checkpoints_requeues_and_resumes(tmp_path, capsys):
    """SIGUSR1 to a running submitit job (SLURM's signal before a time limit): fastssl checkpoints at the
    next step, submitit requeues the job, the requeued job resumes from that checkpoint and finishes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    argv = [*tiny(tmp_path), "config.DATA.TRAIN.DATA_LIMIT=40", "config.OPTIMIZER.num_epochs=8",
            f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=submitit_local"]  # 5 steps an epoch, 40 in all

    def preempt():
        metrics = sweep_dir / "metrics.jsonl"
        for _ in range(600):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(_submitit_job_pid(sweep_dir), signal.SIGUSR1)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    assert main(argv) == 0
    thread.join()
    steps = [json.loads(line)["step"] for line in (sweep_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(40))  # every step once: stopped, requeued, resumed where it stopped
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "Requeued job" in logs and "resuming from" in logs
    assert read_summary(sweep_dir)[0]["status"] == 0


def test_a_malformed_metrics_line_is_skipped_and_counted(tmp_path, capfd):
    from fastssl.sweep import metrics_summary
    lines = [json.dumps({"step": 1, "loss": 2.0, "images_per_s": 10.0}), '{"step": 2, "loss": 1.', "[1, 2]",
             json.dumps({"step": 3, "loss": 1.5, "images_per_s": 30.0}), json.dumps({"phase": "end", "top1": 1.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = metrics_summary(str(tmp_path))
    assert summary == {"final_loss": 1.5, "images_per_s": 30.0, "step": 3, "skipped_lines": 2}
    assert "2 line(s) that are not a step record skipped" in capfd.readouterr().err
