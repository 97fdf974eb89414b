"""Checkpoints: one file per save, written atomically, holding everything for an identical continuation."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint_step(\d+)\.torch$")


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
