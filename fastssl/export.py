"""fastssl-export: the trunk of a checkpoint as a plain torchvision state dict, or the model in VISSL's layout.

    fastssl-export checkpoints/swav_1node_cpu_resnet18 resnet18_swav.torch
    fastssl-export checkpoints/swav_1node_cpu_resnet18/checkpoint_step00000310.torch swav_vissl.torch --format vissl

The input is a fastssl checkpoint (or a run directory: its latest checkpoint) or a VISSL checkpoint, read
as data (fastssl/weights.py). ``torchvision`` writes {"conv1.weight": ..., "layer1.0.conv1.weight": ...}:
for a ResNe(X)t trunk of width multiplier 1 it loads strictly into torchvision's resnet{depth} without
``fc`` (and a RegNet trunk's into torchvision's regnet without ``fc``). ``vissl`` writes
{"classy_state_dict": {"base_model": {"model": {"trunk": {"_feature_blocks.conv1.weight": ...},
"heads": {"0.projection_head.0.weight": ...}}}}}, which VISSL's (and fastssl's) MODEL.WEIGHTS_INIT reads
with its default STATE_DICT_KEY_NAME; VISSL's trunk names are torchvision's for ResNe(X)t only (its RegNet
names its own modules).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .weights import VISSL_KEY, fastssl_name, read_weights_file, select_state_dict, vissl_name

FORMATS = ("torchvision", "vissl")


def input_file(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's latest checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint_step*.torch in {path}")
        return found
    return path


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict (fastssl's names, contiguous tensors: channels_last is a training-time layout) of
    a checkpoint file, or of a run directory's latest one."""
    state, _ = select_state_dict(read_weights_file(input_file(path)), state_dict_key_name=VISSL_KEY)
    return {fastssl_name(name): value.contiguous() for name, value in state.items()}


def torchvision_state_dict(model_state: dict) -> dict[str, torch.Tensor]:
    """The trunk's tensors under torchvision's names (fastssl's trunk names without "trunk.")."""
    trunk = {name[len("trunk."):]: value for name, value in model_state.items() if name.startswith("trunk.")}
    if not trunk:
        raise ValueError("the checkpoint has no trunk tensors")
    return trunk


def vissl_checkpoint(model_state: dict) -> dict:
    """The model in the layout of a VISSL checkpoint (classy_state_dict.base_model.model.{trunk, heads})."""
    parts = {"trunk": {}, "heads": {}}
    for name, value in model_state.items():
        part, _, rest = vissl_name(name).partition(".")
        if part in parts:
            parts[part][rest] = value
    return {VISSL_KEY: {"base_model": {"model": parts}}}


def check_destination(source: str | Path, destination: str | Path, *, force: bool) -> None:
    """Refuse (ValueError) to write onto the input, or onto an existing file without ``force``."""
    source, destination = input_file(source), Path(destination)
    if destination.is_dir():
        raise ValueError(f"{destination} is a directory: name the file to write")
    if destination.exists() and source.exists() and source.samefile(destination):
        raise ValueError(f"{destination} is the input: write the export to another file")
    if (destination.exists() or destination.is_symlink()) and not force:
        raise ValueError(f"{destination} exists: pass --force to replace it")


def save_atomically(state: dict, destination: Path) -> None:
    """torch.save into a fresh temporary file beside ``destination``, then rename: a cut write leaves the
    previous file whole, and a link planted at the name is replaced, never followed."""
    descriptor, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.tmp-")
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def export(source: str | Path, destination: str | Path, *, layout: str, force: bool = False) -> int:
    """Write ``source``'s model in ``layout`` ("torchvision" or "vissl") to ``destination``, atomically; returns
    the number of tensors written. An existing ``destination`` is replaced only with ``force``, and never
    when it is the input (ValueError)."""
    check_destination(source, destination, force=force)
    model_state = read_model_state(source)
    if layout == "torchvision":
        exported = torchvision_state_dict(model_state)
        count = len(exported)
    else:
        exported = vissl_checkpoint(model_state)
        count = sum(len(part) for part in exported[VISSL_KEY]["base_model"]["model"].values())
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    save_atomically(exported, Path(destination))
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (its latest checkpoint)")
    parser.add_argument("output", help="the file to write")
    parser.add_argument("--format", choices=FORMATS, default="torchvision",
                        help="torchvision: the trunk as a plain ResNet state dict; vissl: VISSL's checkpoint layout")
    parser.add_argument("--force", action="store_true", help="replace an existing output file (never the input)")
    args = parser.parse_args(argv)
    try:
        count = export(args.checkpoint, args.output, layout=args.format, force=args.force)
    except (OSError, ValueError) as error:
        print(f"fastssl-export: error: {error}", file=sys.stderr)
        return 2
    print(f"fastssl-export: wrote {count} tensors in {args.format}'s layout to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
