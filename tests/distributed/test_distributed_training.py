"""The trainer on 2 gloo CPU ranks, end to end.

* ``fastssl-train ... NUM_PROC_PER_NODE=2`` spawns two workers whose SwAV step with SyncBN equals a
  one-process step on the same global batch (2 ranks x 4 images vs 1 x 8). The loader deals one
  global permutation per epoch round-robin (loaders/order.py) and draws each sample's crops from
  (seed, epoch, index), so a step sees the same 8 images in both runs, only ordered differently,
  which BN statistics, Sinkhorn and the mean losses do not depend on. One step is compared: this
  tiny setup amplifies float rounding chaotically (ResNet-18's last BN layers see 1x1 maps of 8
  samples), so that two one-process runs differing only in memory format already disagree by
  tens of percent after two steps; the first step's gradients agree to 1e-5.
* SIGTERM to one rank only: the ranks agree on a step, rank 0 checkpoints, all exit 0, and the
  same command resumes and ends bit-for-bit where the uninterrupted run ended.
"""
import json
import time
from pathlib import Path

import torch

from fastssl.checkpoint import latest_checkpoint, load_checkpoint, rank_state_path
from fastssl.train import main
from rank_harness import run_ranks

STEPS = 6  # 16 samples / global batch 8 = 2 steps per epoch, 3 epochs
TINY = ["config=pretrain/swav/swav_1node_cpu_resnet18", "config.MACHINE.DEVICE=cpu",
        "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DATA.TRAIN.DATA_LIMIT=16", "config.OPTIMIZER.num_epochs=3", "config.LOG_FREQUENCY=1",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[module.heads.0.prototypes0.weight, 1]]",
        "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 3, size_crops: [32, 16], "
        "num_crops: [2, 1], crop_scales: [[0.3, 1], [0.1, 0.3]]}, {name: RandomHorizontalFlip, p: 0.5}, "
        "{name: ImgPilColorDistortion, strength: 0.5}, {name: ToTensor}, "
        "{name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]"]
TWO_RANKS = TINY + ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"]


def final_checkpoint(directory, steps: int = STEPS) -> dict:
    saved = load_checkpoint(latest_checkpoint(directory))
    assert saved["step"] == steps
    return saved


def assert_tensors_agree(a: torch.Tensor, b: torch.Tensor, name) -> None:
    """Equal to 1e-4 of the tensor's largest entry (a gradient's small entries carry its rounding)."""
    assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6, name


def test_launcher_two_ranks_with_sync_bn_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    # One step (8 samples, global batch 8). Plain SGD: LARC would rescale the numerically-zero
    # gradient of the Linear bias that feeds a BatchNorm into a unit-size step of pure rounding.
    # No queue: per-rank queues of random initial embeddings are, by design, not one process's queue.
    one_step = ["config.DATA.TRAIN.DATA_LIMIT=8", "config.OPTIMIZER.num_epochs=1", "config.OPTIMIZER.use_larc=False",
                "config.LOSS.swav_loss.queue.queue_length=0"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(TWO_RANKS + one_step + [f"config.CHECKPOINT.DIR={tmp_path / 'two'}"]) == 0
    assert main(TINY + one_step + ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
                                   f"config.CHECKPOINT.DIR={tmp_path / 'one'}"]) == 0
    two, one = final_checkpoint(tmp_path / "two", steps=1), final_checkpoint(tmp_path / "one", steps=1)
    assert (two["derived_world_size"], one["derived_world_size"]) == (2, 1)
    for key, value in one["model"].items():  # weights and BN running statistics
        assert_tensors_agree(two["model"][key].float(), value.float(), key)
    for index, state in one["optimizer"]["state"].items():  # momentum after one step: the gradient
        assert_tensors_agree(two["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"], index)


def _train(argv):
    def rank_main(rank, world_size):
        return main(argv)
    return rank_main


def _sigterm_rank1_after_two_steps(directory: Path):
    def signal_rank1(processes):
        deadline = time.monotonic() + 120
        metrics = directory / "metrics.jsonl"
        while time.monotonic() < deadline and all(p.is_alive() for p in processes):
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                processes[1].terminate()  # SIGTERM, as SLURM preempting one task first
                return
            time.sleep(0.01)
    return signal_rank1


def test_sigterm_on_one_rank_checkpoints_and_the_run_resumes_exactly(tmp_path):
    # With a SwAV queue: each rank's queue differs, so the resume must restore every rank's own state
    # (rank 0 in the checkpoint, rank 1 in its rank_state file).
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    queue = ["config.LOSS.swav_loss.queue.queue_length=16"]
    assert run_ranks(_train(TWO_RANKS + queue + [f"config.CHECKPOINT.DIR={straight_dir}"]), world_size=2,
                     init_group=False, deadline_s=120) == [0, 0]
    straight = final_checkpoint(straight_dir)

    argv = TWO_RANKS + queue + [f"config.CHECKPOINT.DIR={stopped_dir}"]
    statuses = run_ranks(_train(argv), world_size=2, init_group=False, deadline_s=120,
                         while_running=_sigterm_rank1_after_two_steps(stopped_dir))
    assert statuses == [0, 0]  # both ranks stopped cleanly, although only rank 1 was signalled
    stopped_at = load_checkpoint(latest_checkpoint(stopped_dir))["step"]
    assert 2 <= stopped_at < STEPS, "the stop lands mid-run, at the vote after the signal"

    assert run_ranks(_train(argv), world_size=2, init_group=False, deadline_s=120) == [0, 0]  # the same command
    resumed = final_checkpoint(stopped_dir)
    logged = [json.loads(line)["step"] for line in (stopped_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(STEPS))  # each step ran once: none repeated or skipped by the resume
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(resumed["method"]["queue"], straight["method"]["queue"])
    rank1 = [load_checkpoint(rank_state_path(d, step=STEPS, rank=1)) for d in (straight_dir, stopped_dir)]
    assert torch.equal(rank1[0]["method"]["queue"], rank1[1]["method"]["queue"])
    assert not torch.equal(rank1[0]["method"]["queue"], straight["method"]["queue"])  # per-rank queues differ


def test_eight_node_config_with_one_process_per_node_trains_here_with_a_notice(tmp_path, capfd):
    # The seed page's single-GPU line keeps NUM_NODES=8: no launcher environment, so one process.
    assert main(TINY + ["config.DISTRIBUTED.NUM_NODES=8", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
                        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.DATA.TRAIN.DATA_LIMIT=8",
                        "config.OPTIMIZER.num_epochs=1", f"config.CHECKPOINT.DIR={tmp_path}"]) == 0
    assert "training on one process" in capfd.readouterr().err
    assert load_checkpoint(latest_checkpoint(tmp_path))["derived_world_size"] == 1


NPID_TWO_RANKS = [
    "config=pretrain/npid/npid_1node_cpu_resnet18", "config.MACHINE.DEVICE=cpu",
    "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
    "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.DATA.TRAIN.DATA_LIMIT=16", "config.OPTIMIZER.num_epochs=2", "config.LOG_FREQUENCY=1",
    "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
    "config.LOSS.nce_loss_with_memory.negative_sampling_params.num_negatives=8",
    "config.LOSS.nce_loss_with_memory.memory_params.embedding_dim=1024",  # a bank (64 KB) larger than RNG states
    "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 16}, {name: ToTensor}]",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"]


def test_shared_method_state_is_saved_once_and_a_two_rank_resume_is_exact(tmp_path):
    # NPID's bank is the same on every rank: it is in the checkpoint only, never in a per-rank file.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_ranks(_train(NPID_TWO_RANKS + [f"config.CHECKPOINT.DIR={straight}"]), world_size=2,
                     init_group=False, deadline_s=120) == [0, 0]
    final = final_checkpoint(straight, steps=4)
    bank = final["method"]["bank"]
    assert bank.shape == (16, 1024)
    own = rank_state_path(straight, step=4, rank=1)
    rank1 = load_checkpoint(own)
    assert set(rank1) == {"method", "rng"} and "bank" not in rank1["method"] and "norm_constant" not in rank1["method"]
    assert own.stat().st_size < bank.numel() * bank.element_size()

    # Resume from the end of epoch 0 (step 2): the checkpoint and rank 1's file, copied to a fresh directory.
    resumed.mkdir()
    for name in ("checkpoint_step00000002.torch", "rank_state_step00000002_rank1.torch"):
        (resumed / name).write_bytes((straight / name).read_bytes())
    assert run_ranks(_train(NPID_TWO_RANKS + [f"config.CHECKPOINT.DIR={resumed}"]), world_size=2,
                     init_group=False, deadline_s=120) == [0, 0]
    losses = {d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, resumed)}
    assert losses[resumed] == losses[straight][2:]
    again = final_checkpoint(resumed, steps=4)
    for part in ("model", "method"):
        for key, value in final[part].items():
            assert torch.equal(again[part][key], value) if isinstance(value, torch.Tensor) else again[part][key] == value
