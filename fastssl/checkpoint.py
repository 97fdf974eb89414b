"""Checkpoints: one file per save, written atomically, holding everything for an identical continuation.

``TrainingCheckpoint`` is the one save/restore pair of a run. State that every rank holds alike (the
model, the optimizer, a method's shared state such as NPID's bank) is written once, by rank 0, in
``checkpoint_stepNNNNNNNN.torch``; each rank > 0 writes only its own part (the method's rank-local
state, such as SwAV's queue, and its random streams) to ``rank_state_stepNNNNNNNN_rankR.torch``.
Rank 0's own part is inside the checkpoint, so a checkpoint alone holds a whole method state.
"""
from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint_step(\d+)\.torch$")


@dataclass
class TrainState:
    """Where training stands: the next global step to run and its place in the epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(state: dict, final: Path) -> None:
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)


def rank_state_path(directory: str | Path, *, step: int, rank: int) -> Path:
    return Path(directory) / f"rank_state_step{step:08d}_rank{rank}.torch"


def save_rank_state(directory: str | Path, state: dict, *, step: int, rank: int) -> Path:
    """A rank's own part of the checkpoint of ``step`` (its method state and random streams)."""
    final = rank_state_path(directory, step=step, rank=rank)
    final.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(state, final)
    return final


def save_checkpoint(directory: str | Path, state: dict, *, step: int, keep: int = 2) -> Path:
    """Write ``state`` to DIR/checkpoint_step<step>.torch via a temporary file and a rename.

    A run killed mid-write leaves the previous checkpoint intact. Older checkpoints beyond ``keep``
    are removed only after the new one is in place.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint_step{step:08d}.torch"
    _write_atomically(state, final)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old_step = int(_NAME.match(old.name).group(1))
        for sidecar in directory.glob(f"rank_state_step{old_step:08d}_rank*.torch"):
            sidecar.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class TrainingCheckpoint:
    """Save and restore one run: shared state once (rank 0), rank-local state per rank (see the module doc).

    model: the plain module (not its DDP / compiled wrapper). extra_state: saved as is (config, head params).
    """

    def __init__(self, *, directory: str | Path, rank: int, model, optimizer, scaler, method, extra_state: dict):
        self.directory = Path(directory)
        self.rank = rank
        self.model, self.optimizer, self.scaler, self.method = model, optimizer, scaler, method
        self.extra_state = extra_state

    def save(self, state: TrainState) -> Path | None:
        """Every rank calls this together. Ranks > 0 write their own part first; rank 0 writes the
        checkpoint once they all have, so a checkpoint on disk always has its per-rank files."""
        shared, local = self.method.split_state_dict()
        if self.rank != 0:
            save_rank_state(self.directory, {"method": local, "rng": rng_state()}, step=state.step, rank=self.rank)
        if _distributed():
            torch.distributed.barrier()
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.directory, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "method": {**shared, **local}, "rng": rng_state(),
                "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                **self.extra_state}, step=state.step)
        if _distributed():
            torch.distributed.barrier()
        return path

    def restore_latest(self, *, map_location) -> tuple[TrainState, Path] | None:
        """Load the latest checkpoint of the directory into the run's objects; None when there is none."""
        path = latest_checkpoint(self.directory)
        if path is None:
            return None
        saved = load_checkpoint(path, map_location=map_location)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        method_state, rng = saved["method"], saved["rng"]
        if self.rank > 0:
            own = rank_state_path(self.directory, step=saved["step"], rank=self.rank)
            if own.exists():
                mine = load_checkpoint(own, map_location=map_location)
                method_state, rng = {**method_state, **mine["method"]}, mine["rng"]
            else:  # the run was saved with fewer ranks
                print(f"fastssl: no per-rank state {own.name}: rank {self.rank} resumes with rank 0's method "
                      "state", file=sys.stderr)
        self.method.load_state_dict(method_state)
        set_rng_state(rng)
        return TrainState(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"]), path
