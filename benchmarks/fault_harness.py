"""The fault harness's machinery, which benchmarks/faults.py's scenarios drive: the tiny CPU recipe that
every scenario runs (TINY: a SwAV run of 12 steps on 32 px images, checkpoints every 3 steps), the Harness
that starts fastssl-train commands and counts their processes by an environment marker, and the checks
of a run against an uninterrupted one. Kept apart from the scenarios so that each reads on its own, and so
that benchmarks/reproducibility.py and the tests use the harness without the scenarios and the command.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "FASTSSL_FAULT_TRIAL"
STEPS = 12  # 3 epochs of 4 steps: 32 images, 8 per step
TINY = ["config=pretrain/swav/swav_1node_cpu_resnet18", "config.MACHINE.DEVICE=cpu",
        "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DATA.TRAIN.DATA_LIMIT=32", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.OPTIMIZER.num_epochs=3", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1",
        "config.LOSS.swav_loss.queue.queue_length=16", "config.LOSS.swav_loss.queue.start_iter=4",
        "config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, total_num_crops: 3, size_crops: [32, 16], "
        "num_crops: [2, 1], crop_scales: [[0.3, 1], [0.1, 0.3]]}, {name: RandomHorizontalFlip, p: 0.5}, "
        "{name: ImgPilColorDistortion, strength: 0.5}, {name: ToTensor}, "
        "{name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]"]
TWO_RANKS = ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DISTRIBUTED.BACKEND=gloo",
             "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"]


@dataclass
class Result:
    scenario: str
    checked: str
    trials: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def trial(self, ok: bool, why: str = "") -> None:
        self.trials += 1
        self.passed += ok
        if not ok:
            self.failures.append(why)


@dataclass
class Finished:
    status: int
    stdout: str
    stderr: str
    seconds: float


class Harness:
    """Runs fastssl-train commands in DIR (one sub-folder a run), with a marker to count their processes."""

    def __init__(self, workdir: Path, rng: random.Random):
        self.workdir, self.rng = workdir, rng
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, MARKER: self.marker, "PYTHONUNBUFFERED": "1",
                    "FASTSSL_CACHE": str(workdir / "cache")}
        self.references: dict[str, Path] = {}

    def command(self, directory: Path, *extra: str, ranks: int = 1) -> list[str]:
        return [sys.executable, "-m", "fastssl.train", *TINY, *(TWO_RANKS if ranks == 2 else []), *extra,
                f"config.CHECKPOINT.DIR={directory}"]

    def start(self, argv: list[str], *, env: dict | None = None, limit_file_bytes: int | None = None):
        log = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")

        def limit():  # in the child: a file-size limit makes a write fail with EFBIG (Python ignores SIGXFSZ)
            if limit_file_bytes is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

        process = subprocess.Popen(argv, stdout=log[0], stderr=log[1], env={**self.env, **(env or {})},
                                   start_new_session=True, preexec_fn=limit)
        process.logs, process.started = log, time.monotonic()
        return process

    @staticmethod
    def finish(process, timeout_s: float = 600) -> Finished:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        texts = []
        for log in process.logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        return Finished(process.returncode, texts[0], texts[1], time.monotonic() - process.started)

    def run(self, argv: list[str], **options) -> Finished:
        return self.finish(self.start(argv, **options))

    def reference(self, ranks: int = 1) -> Path:
        """An uninterrupted run (made once per rank count)."""
        key = f"reference_{ranks}"
        if key not in self.references:
            directory = self.workdir / key
            done = self.run(self.command(directory, ranks=ranks))
            if done.status != 0:
                raise RuntimeError(f"the uninterrupted {ranks}-rank run failed: {done.stderr.strip()[-2000:]}")
            self.references[key] = directory
        return self.references[key]

    def fresh(self, name: str) -> Path:
        directory = self.workdir / f"{name}_{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        return directory

    def wait_until_gone(self, *, timeout_s: float) -> tuple[list[int], float]:
        """Wait until no marked process is alive: (those still alive at the deadline, seconds waited)."""
        began = time.monotonic()
        while self.processes() and time.monotonic() - began < timeout_s:
            time.sleep(0.05)
        left = self.processes()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left, time.monotonic() - began

    def processes(self) -> list[int]:
        """Pids of live processes carrying this harness's marker (fastssl-train, its workers, their loaders)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if f"{MARKER}={self.marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                        if (entry / "stat").read_text().split(")")[-1].split()[0] != "Z":
                            found.append(int(entry.name))
                except OSError:
                    continue
        return found


def logged_losses(directory: Path) -> list[tuple[int, float]]:
    """(step, loss) of every whole training record of metrics.jsonl, in file order."""
    records = []
    path = directory / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record and record.get("phase") != "end":
            records.append((record["step"], record["loss"]))
    return records


def wait_for_step(directory: Path, step: int, process, timeout_s: float = 300) -> bool:
    """Until metrics.jsonl logs ``step`` (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s >= step for s, _ in logged_losses(directory)):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def same_run(directory: Path, reference: Path, *, from_step: int = 0) -> str:
    """'' when every step from ``from_step`` on was logged once with the reference's loss and the final weights
    are equal; else why."""
    from fastssl.checkpoint import latest_checkpoint, load_checkpoint

    ours, theirs = logged_losses(directory), logged_losses(reference)[from_step:]
    if [s for s, _ in ours] != list(range(from_step, STEPS)):
        return f"steps logged {[s for s, _ in ours]}"
    different = [s for (s, a), (_, b) in zip(ours, theirs) if a != b]
    if different:
        return f"losses differ at steps {different}"
    a, b = (load_checkpoint(latest_checkpoint(d))["model"] for d in (directory, reference))
    unequal = [k for k in a if not (a[k] == b[k]).all()]
    return f"final weights differ: {unequal[:3]}" if unequal else ""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(stderr: str) -> str:
    """The error line when stderr holds exactly one 'fastssl-train: error:' line and no traceback, else ''."""
    errors = [line for line in stderr.splitlines() if line.startswith("fastssl-train: error:")]
    return errors[0] if len(errors) == 1 and "Traceback" not in stderr else ""
