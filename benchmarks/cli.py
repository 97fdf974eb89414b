"""fastssl-bench: side-by-side throughput benchmarks (a ratio against a baseline in one run).

    fastssl-bench loader [options]    loader backends against a per-crop PIL DataLoader baseline
    fastssl-bench kernels [options]   NPID step and k-means against straightforward baselines
    fastssl-bench comm [options]      bytes per collective and expected scaling efficiency (on paper)
    fastssl-bench train [options]     the training step of a config, broken down, beside a bare loop
    fastssl-bench switches [options]  what each speed switch buys (channels_last, compile, workers, backends)
    fastssl-bench faults [options]    the fault harness: kill -9, damaged checkpoints, a full disk, SIGTERM, a dying
                                      rank, unreadable images, a config fuzz, against the real fastssl-train
    fastssl-bench learn [options]     trained trunks against random ones (kNN, linear) per recipe and loader backend
    fastssl-bench attacks [options]   crafted input against the real commands: refused in one line or a counted skip,
                                      nothing of the user's overwritten, bounded memory (issue 23)
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"loader": "benchmarks.loader", "kernels": "benchmarks.kernels", "comm": "benchmarks.comm_volume",
            "train": "benchmarks.train_step", "faults": "benchmarks.faults", "learn": "benchmarks.learn",
            "attacks": "benchmarks.attacks",
            "switches": "benchmarks.switches"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    result = module.main(argv[1:])  # some return their figures as a dict
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
