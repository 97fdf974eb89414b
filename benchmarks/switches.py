"""fastssl-bench switches: what each speed switch buys, side by side in one run on one config.

    fastssl-bench switches --config pretrain/swav/swav_1node_cpu_resnet18 [--warmup 3] [--steps 10]
    fastssl-bench switches --variant "cifar stem=config.MODEL.TRUNK.RESNETS.STEM=cifar" [--no-defaults]

Runs ``fastssl-bench train`` (fastssl's real loop beside a bare loop of the same model and crops) once for the
config as it is and once for each variant (one or more config.KEY=value overrides on top), one after another
in this process, and prints images/s, the ratio to the config as it is, the data-wait share and the loop
overhead of each. The default variants are the switches a user has: channels_last flipped, torch.compile on,
the DataLoader's worker count (0, 1, 2, 4: workers take CPU from the step on a small machine), and the other
two loader backends (DALI, FFCV). A variant that cannot run here (a backend not installed) is reported as
such. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys

from benchmarks import train_step
from benchmarks.kernels import git_commit

DEFAULT_VARIANTS = [
    ("channels_last flipped", ["config.MODEL.CHANNELS_LAST={flipped_channels_last}"]),
    ("torch.compile", ["config.MODEL.TORCH_COMPILE=True"]),
    ("0 loader workers (in the step's process)", ["config.DATA.NUM_DATALOADER_WORKERS=0"]),
    ("1 loader worker", ["config.DATA.NUM_DATALOADER_WORKERS=1"]),
    ("4 loader workers", ["config.DATA.NUM_DATALOADER_WORKERS=4"]),
    ("DALI loader", ["config.DATA.TRAIN.LOADER=dali"]),
    ("FFCV loader", ["config.DATA.TRAIN.LOADER=ffcv"]),
]


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not overrides.startswith("config."):
        raise argparse.ArgumentTypeError(f"--variant takes 'NAME=config.KEY=value [config.KEY=value ...]', "
                                         f"got {text!r}")
    return name, shlex.split(overrides)


def _channels_last(config: str, overrides: list[str]) -> bool:
    from fastssl.config import compose_config

    return bool(compose_config([f"config={config}", *overrides]).MODEL.CHANNELS_LAST)


def run_variant(config: str, overrides: list[str], *, warmup: int, steps: int) -> dict:
    """fastssl-bench train's figures for ``config`` + ``overrides`` ({'error': ...} when it cannot run)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return train_step.main(["--config", config, "--warmup", str(warmup), "--steps", str(steps), *overrides])
    except (ImportError, ValueError, RuntimeError) as error:
        return {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-bench switches", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=train_step.CPU_CONFIG)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", action="append", type=_parse_variant, default=[],
                        help="NAME=config.KEY=value [...]: a variant of your own (repeatable)")
    parser.add_argument("--no-defaults", action="store_true", help="only the config as it is and --variant's")
    parser.add_argument("overrides", nargs="*", help="config.KEY=value applied to every run")
    args = parser.parse_args(argv)
    flipped = str(not _channels_last(args.config, args.overrides))
    variants = [("as configured", [])] + ([] if args.no_defaults else [
        (name, [o.format(flipped_channels_last=flipped) for o in overrides]) for name, overrides in DEFAULT_VARIANTS])
    variants += args.variant
    rows = []
    for name, overrides in variants:
        figures = run_variant(args.config, [*args.overrides, *overrides], warmup=args.warmup, steps=args.steps)
        rows.append({"variant": name, "overrides": overrides, **figures})
        print(f"{name}: " + (figures.get("error") or f"{figures['images_per_s']:.1f} images/s"), file=sys.stderr,
              flush=True)
    print_table(rows, config=args.config)
    print(json.dumps({"benchmark": "switches", "config": args.config, "commit": git_commit(),
                      "command": "fastssl-bench switches " + shlex.join(sys.argv[2:] if argv is None else argv),
                      "rows": rows}))
    return 0


def print_table(rows: list[dict], *, config: str) -> None:
    base = rows[0].get("images_per_s")
    print(f"{config}: images/s of fastssl's step per variant (the bare loop of the same model beside each)")
    print(f"{'variant':<44}{'images/s':>10}{'vs as configured':>18}{'data wait':>11}{'loop overhead':>15}"
          f"{'vs bare loop':>14}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<44}{'cannot run here: ' + row['error']}")
            continue
        ratio = row["images_per_s"] / base if base else float("nan")
        print(f"{row['variant']:<44}{row['images_per_s']:>10.1f}{ratio:>17.2f}x{row['data_wait_share']:>11.1%}"
              f"{row['loop_overhead']:>+15.1%}{row['end_to_end_vs_bare']:>13.2f}x")
