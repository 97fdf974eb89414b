"""Why a run's figures differ between machines: the fault harness's 12-step SwAV recipe (benchmarks/fault_harness.py)
run as is, again, and with one kernel setting changed each time (thread count, ATen's and oneDNN's
instruction set); prints the loss at the first and last step of each and where it first differs.

    .venv/bin/python -m benchmarks.reproducibility
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

from benchmarks.fault_harness import Harness, logged_losses

VARIANTS = {"as is": {}, "as is, again": {}, "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
            "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
            "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
            # Every kernel library held to AVX2: on an AVX-512 machine, do the losses become an AVX2 machine's?
            "pinned to AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}}


def main() -> int:
    harness = Harness(Path(tempfile.mkdtemp(prefix="fastssl-repro-")), random.Random(0))
    losses = {}
    for name, env in VARIANTS.items():
        directory = harness.fresh("run")
        done = harness.run(harness.command(directory), env=env)
        if done.status:
            print(f"{name}: exit {done.status}: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        losses[name] = [loss for _, loss in logged_losses(directory)]
    base = losses["as is"]
    print(f"{'run':<30}{'step 0 loss':>16}{'last step loss':>16}  first step that differs from 'as is'")
    for name, values in losses.items():
        first = next((i for i, (a, b) in enumerate(zip(base, values)) if a != b), None)
        print(f"{name:<30}{values[0]:>16.10f}{values[-1]:>16.10f}  {'none' if first is None else first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
