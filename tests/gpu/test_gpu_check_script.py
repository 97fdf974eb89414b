"""The CPU half of the GPU check: its dry run names every step (CI runs this; a GPU machine runs the rest)."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_every_step_with_its_time_limit():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = [line.split(" (at most")[0][3:] for line in result.stdout.splitlines() if line.startswith("== ")]
    assert steps == ["setup", "cuda-tests", "loader", "train-swav", "train-deepclusterv2", "train-npid"]
    limits = [int(line.split("at most ")[1].split("s)")[0]) for line in result.stdout.splitlines()
              if line.startswith("== ")]
    assert sum(limits[1:]) <= 8 * 60  # the checks fit one device call of at most eight minutes after the set-up
    assert "-m gpu tests/gpu" in result.stdout and "TORCH_COMPILE=True" in result.stdout
