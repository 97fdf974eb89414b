"""Run logging: a progress bar with images/s, data-wait share and ETA; rank-0 JSONL; TensorBoard."""
from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def notice(message: str) -> None:
    """A one-line message to the user, printed once per job (by the first worker only)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fastssl: {message}", file=sys.stderr, flush=True)


def open_without_links(path: Path, mode: str):
    """open(path, mode) for "r" or "a", refusing (ValueError) a symbolic link at ``path``: a link planted in
    the run's folder would otherwise make fastssl read or append to the file it points to."""
    flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT}[mode]
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link: fastssl writes its own files and follows no link "
                             "(remove it)") from None
        raise
    return os.fdopen(descriptor, mode, buffering=1)


def _keep_records_before(path: Path, start_step: int) -> None:
    """Drop the records of steps at or after ``start_step`` (they run again after a resume from an earlier
    checkpoint, as after a kill -9) and a line cut short by a kill, so every step is logged once. The kept
    lines go to a fresh temporary file renamed over ``path`` (a name planted beside it is never followed)."""
    if not (path.exists() or path.is_symlink()):
        return
    with open_without_links(path, "r") as f:
        lines = f.read().splitlines()
    kept = [line for line in lines if _step_of(line) < start_step]
    if len(kept) < len(lines):
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(descriptor, "w") as f:
                f.write("".join(f"{line}\n" for line in kept))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl (none if it does not exist) and the number of lines that are not a JSON
    object (a line cut short by a kill, or damage): skipped and counted, so one bad line loses only itself."""
    if not path.exists():
        return [], 0
    with open_without_links(path, "r") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, len(lines) - len(records)


class RunLogger:
    """Prints and records metrics on rank 0; a no-op elsewhere."""

    def __init__(self, *, directory: str | Path, enabled: bool, use_tensorboard: bool, progress_bar: bool,
                 total_steps: int, start_step: int, wandb_options: dict | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.bar = None
        self.jsonl = None
        self.wandb = None
        self.latest_knn: float | None = None  # shown on the progress line until the next kNN
        if not enabled:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _keep_records_before(directory / "metrics.jsonl", start_step)
        self.jsonl = open_without_links(directory / "metrics.jsonl", "a")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"))
            except ImportError:
                print("fastssl: tensorboard is not installed; no event files are written", file=sys.stderr)
        if wandb_options:
            self.wandb = _start_wandb(directory=directory, **wandb_options)
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)

    def info(self, message: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)

    def warn(self, message: str) -> None:
        """A warning line, on stderr (rank 0)."""
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def _scalars(self, record: dict, prefix: str) -> None:
        """TensorBoard and W&B scalars of a record, under ``prefix``/."""
        scalars = {f"{prefix}/{key}": value for key, value in record.items()
                   if key not in ("step", "epoch") and isinstance(value, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def log(self, record: dict, *, steps_done: int) -> None:
        """Record one metrics dict (step, epoch, loss, lr, images_per_s, data_wait_share, and the monitor's
        rank_trunk, rank_embedding, embedding_std_ratio, prototypes_in_use, knn_top1 where measured)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._scalars(record, "train")
        if "knn_top1" in record:  # the kNN monitor's (fastssl/monitor.py): a line, and on the progress line from now on
            self.latest_knn = record["knn_top1"]
            self.info(f"fastssl: kNN top-1 {record['knn_top1']:.2f}% on {record['knn_images']} held-out images after "
                      f"epoch {record['epoch'] + 1} (step {record['step'] + 1}), {record['knn_seconds']:.1f} s")
        watched = {"knn": f"{self.latest_knn:.1f}%"} if self.latest_knn is not None else {}
        if "rank_embedding" in record or "rank_trunk" in record:
            watched["rank"] = f"{record.get('rank_embedding', record.get('rank_trunk')):.1f}"
        if self.bar is not None:
            self.bar.n = steps_done
            self.bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                 img_s=f"{record['images_per_s']:.1f}",
                                 wait=f"{100 * record['data_wait_share']:.0f}%", **watched)
            self.bar.refresh()
        else:
            remaining = (self.total_steps - steps_done) * record.get("seconds_per_step", 0.0)
            print(f"step {record['step']} epoch {record['epoch']} loss {record['loss']:.4f} lr {record['lr']:.4g} "
                  f"img/s {record['images_per_s']:.1f} data-wait {100 * record['data_wait_share']:.0f}% "
                  + "".join(f"{key} {value} " for key, value in watched.items())
                  + f"eta {remaining / 60:.1f} min", flush=True)

    def log_final(self, metrics: dict, *, step: int) -> None:
        """The run's final metrics (method.on_train_end): one printed line, one metrics.jsonl record with
        "phase": "end", TensorBoard scalars under end/."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"time": time.time(), "step": step, "phase": "end", **metrics}) + "\n")
        self._scalars({"step": step, **metrics}, "end")
        shown = ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                          for key, value in metrics.items())
        self.info(f"fastssl: end of training (step {step}): {shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


def _start_wandb(*, directory: Path, project: str, mode: str, config: dict):
    """A Weights & Biases run beside TensorBoard (HOOKS.WANDB), its files under ``directory``/wandb; None with
    a notice where wandb is not installed."""
    try:
        import wandb
    except ImportError:
        print('fastssl: HOOKS.WANDB.ENABLED but wandb is not installed (pip install -e ".[wandb]"); not logging '
              "to W&B", file=sys.stderr)
        return None
    (directory / "wandb").mkdir(exist_ok=True)
    return wandb.init(project=project, mode=mode, dir=str(directory), name=directory.name, config=config)
