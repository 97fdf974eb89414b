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
import sys
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .weights import VISSL_KEY, fastssl_name, read_weights_file, select_state_dict, vissl_name

FORMATS = ("torchvision", "vissl")


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict (fastssl's names, contiguous tensors: channels_last is a training-time layout) of
    a checkpoint file, or of a run directory's latest one."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint_step*.torch in {path}")
        path = found
    state, _ = select_state_dict(read_weights_file(path), state_dict_key_name=VISSL_KEY)
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


def export(source: str | Path, destination: str | Path, *, layout: str) -> int:
    """Write ``source``'s model in ``layout`` ("torchvision" or "vissl") to ``destination``; returns the
    number of tensors written."""
    model_state = read_model_state(source)
    if layout == "torchvision":
        exported = torchvision_state_dict(model_state)
        count = len(exported)
    else:
        exported = vissl_checkpoint(model_state)
        count = sum(len(part) for part in exported[VISSL_KEY]["base_model"]["model"].values())
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    torch.save(exported, destination)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (its latest checkpoint)")
    parser.add_argument("output", help="the file to write")
    parser.add_argument("--format", choices=FORMATS, default="torchvision",
                        help="torchvision: the trunk as a plain ResNet state dict; vissl: VISSL's checkpoint layout")
    args = parser.parse_args(argv)
    try:
        count = export(args.checkpoint, args.output, layout=args.format)
    except (FileNotFoundError, ValueError) as error:
        print(f"fastssl-export: error: {error}", file=sys.stderr)
        return 2
    print(f"fastssl-export: wrote {count} tensors in {args.format}'s layout to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
