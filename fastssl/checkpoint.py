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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .weights import NUMPY_GLOBALS_OF_FASTSSL_CHECKPOINTS

class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, or that does not fit the run (a one-line message)."""


_NAME = re.compile(r"^checkpoint_step(\d+)\.torch$")
_UNFINISHED = ".*.torch.tmp-*"  # the temporary file of a save that never finished (a kill -9 inside it)
SAVE_DELAY_VARIABLE = "FASTSSL_TEST_SAVE_DELAY_S"  # seconds between the written temporary file and its rename


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
    """torch.save to a fresh temporary file beside ``final`` (created exclusively, so a file or link planted
    at its name is never followed), then rename. A failed write (a full disk) removes the temporary file
    and is a one-line CheckpointError; ``final`` and every older checkpoint stay as they were."""
    descriptor, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(SAVE_DELAY_VARIABLE):  # test-only: the fault harness aims a kill -9 inside a save
            time.sleep(float(os.environ[SAVE_DELAY_VARIABLE]))
        os.replace(temporary, final)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a short write as a RuntimeError
        Path(temporary).unlink(missing_ok=True)
        detail = (error.strerror if isinstance(error, OSError) and error.strerror else
                  "the write stopped short")  # torch's zip writer says "unexpected pos ...", no errno
        raise CheckpointError(f"cannot write checkpoint {final} ({detail}: is the disk full, or a file-size limit "
                              "reached?); the previous checkpoints are intact") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_unfinished_saves(directory: Path) -> None:
    """Remove the temporary files of saves that were killed before their rename (never read as checkpoints:
    list_checkpoints matches only finished names). Called before training starts, when no rank writes."""
    unfinished = sorted(directory.glob(_UNFINISHED)) if directory.is_dir() else []
    for path in unfinished:
        path.unlink(missing_ok=True)
    if unfinished:
        print(f"fastssl: removed {len(unfinished)} unfinished checkpoint file(s) of an interrupted save: "
              f"{', '.join(p.name for p in unfinished)}", file=sys.stderr)


# What fastssl writes in a CHECKPOINT.DIR: checkpoints and their temporary files, metrics, TensorBoard, ClusterFit's
# features and outputs, linear evaluation runs, a sweep job's own files (Hydra's .hydra, submitit's logs).
_OWN_NAMES = re.compile(r"^(checkpoint_step\d+\.torch|rank_state_step\d+_rank\d+\.torch|metrics\.jsonl|tensorboard"
                        r"|nan_dump_rank\d+_step\d+\.torch|features_.*|linear_eval.*|sweep_job\.json"
                        r"|.*_(labels|images|centroids)\.npy|.*_summary\.json|.*\.log|\..*)$")
_LONGEST_OWN_NAME = 64  # characters of the longest file name fastssl writes there (a checkpoint's temporary file)


def check_checkpoint_directory(directory: str | Path) -> str | None:
    """Check CHECKPOINT.DIR before any data or model is built: create it and write a probe file there, so a
    path that is a file, unwritable or too long is a one-line CheckpointError now rather than at the first save.
    The filesystem's root or the home directory is refused; a directory holding files fastssl did not write is
    returned as a notice (the checkpoints go beside them; fastssl never removes them)."""
    directory = Path(os.path.abspath(Path(directory).expanduser()))
    name_max, path_max = os.pathconf(directory.anchor, "PC_NAME_MAX"), os.pathconf(directory.anchor, "PC_PATH_MAX")
    if max(len(part) for part in directory.parts) > name_max or len(str(directory)) + 1 + _LONGEST_OWN_NAME > path_max:
        raise CheckpointError(f"config.CHECKPOINT.DIR is too long ({len(str(directory))} characters; a name may have "
                              f"{name_max}, a path {path_max} with the checkpoint's own name)")
    directory = directory.resolve()
    refused = {Path(directory.anchor): "the root of the filesystem", Path.home().resolve(): "your home directory"}
    if directory in refused:
        raise CheckpointError(f"config.CHECKPOINT.DIR={directory} is {refused[directory]}: name a folder of its own "
                              "for the run's checkpoints")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"config.CHECKPOINT.DIR={directory} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=directory, prefix=".fastssl-probe-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"config.CHECKPOINT.DIR={directory} cannot hold checkpoints: "
                              f"{error.strerror or type(error).__name__}") from None
    foreign = sorted(path.name for path in directory.iterdir() if not _OWN_NAMES.match(path.name))
    if foreign:
        return (f"config.CHECKPOINT.DIR={directory} holds {len(foreign)} file(s) fastssl did not write (such as "
                f"{foreign[0]!r}); the run's files go beside them and fastssl never removes them")
    return None


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
    """A checkpoint read with ``weights_only=True`` (tensors, numbers, strings, plain containers and the
    numpy RNG state), so that a file from anywhere cannot run code; a one-line CheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS_OF_FASTSSL_CHECKPOINTS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines() or [type(error).__name__]
        first_sentence = detail[0].split(". ")[0].rstrip(".")  # torch's zip reader adds several sentences of advice
        raise CheckpointError(f"cannot read checkpoint {path}: {first_sentence}") from None


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
        """Load the newest usable checkpoint of the directory into the run's objects; None when there is none.

        An unreadable checkpoint (truncated, empty, not a torch file) or one of another model is skipped with
        a one-line warning naming it; if none is usable, a one-line CheckpointError says why.
        """
        if self.rank == 0:
            _remove_unfinished_saves(self.directory)
        found = list_checkpoints(self.directory)
        problems = []
        for path in reversed(found):
            try:
                saved = load_checkpoint(path, map_location=map_location)
                self._check_fits(saved, path)
            except CheckpointError as error:
                problems.append(str(error))
                print(f"fastssl: warning: {error}; trying an older checkpoint", file=sys.stderr)
                continue
            return self._load(saved, map_location=map_location), path
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.directory} (newest: {problems[0]})")
        return None

    def _check_fits(self, saved: dict, path: Path) -> None:
        """A one-line CheckpointError when the checkpoint's tensors do not fit this model, naming the first
        model setting that differs (or else the first tensor)."""
        own, theirs = self.model.state_dict(), saved.get("model", {})
        mismatch = next((name for name in sorted(set(own) | set(theirs))
                         if name not in own or name not in theirs or own[name].shape != theirs[name].shape), None)
        if mismatch is None:
            return
        ours_cfg, theirs_cfg = self.extra_state.get("config", {}), saved.get("config", {})
        for key in ("TRUNK", "HEAD"):
            difference = _first_difference(ours_cfg.get("MODEL", {}).get(key), theirs_cfg.get("MODEL", {}).get(key),
                                           f"MODEL.{key}")
            if difference:
                raise CheckpointError(f"checkpoint {path} is of another model: {difference}")
        shapes = [tuple(t[mismatch].shape) if mismatch in t else "absent" for t in (theirs, own)]
        raise CheckpointError(f"checkpoint {path} is of another model: tensor {mismatch} is {shapes[0]} there, "
                              f"{shapes[1]} here")

    def _load(self, saved: dict, *, map_location) -> TrainState:
        scales = [group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
        if len(saved["optimizer"]["param_groups"]) != len(scales):  # checked before anything is loaded
            raise CheckpointError(f"the checkpoint's optimizer has {len(saved['optimizer']['param_groups'])} "
                                  f"parameter groups, this run's {len(scales)}: OPTIMIZER.head_lr_multipliers, "
                                  f"weight-decay or LARS exclusions differ from the run that saved it")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, scale in zip(self.optimizer.param_groups, scales):  # the config's multipliers, not the saved ones
            group["lr_scale"] = scale
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
        return TrainState(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"])


def _first_difference(ours, theirs, path: str) -> str:
    """'PATH: theirs -> ours' for the first differing leaf of two config trees ('' when equal)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            if key in ours and key in theirs:
                found = _first_difference(ours[key], theirs[key], f"{path}.{key}")
                if found:
                    return found
        return ""
    return "" if ours == theirs else f"{path} is {theirs!r} there, {ours!r} here"
