"""The training loop: one loop for every method, readable top to bottom (STYLE.md, "The loop")."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import TrainingCheckpoint, TrainState, latest_checkpoint
from .methods.base import Method
from .metrics import RunLogger
from .monitor import RunMonitor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the offending tensors were written to ``dump_path``."""


def _last_good(checkpoint: TrainingCheckpoint) -> str:
    """What a NaN stop leaves to resume from: the latest checkpoint, or none (it is not promised when absent)."""
    last = latest_checkpoint(checkpoint.directory)
    return (f"the last good checkpoint, {last}, is intact" if last else
            f"no checkpoint was saved before it in {checkpoint.directory}")


@dataclass
class LoopSettings:
    num_epochs: int
    steps_per_epoch: int
    lr_schedule: np.ndarray                  # (total_steps,) learning rate at every global step
    autocast_dtype: torch.dtype | None       # None: full precision
    log_frequency: int
    checkpoint_every_epochs: int
    checkpoint_every_steps: int              # -1: off
    frozen_params: list = field(default_factory=list)  # [(list of parameters, until_step)]
    rank: int = 0
    images_per_step: int = 0                 # global images per step, for images/s
    stop_requested: object = None            # callable -> bool: checkpoint and stop at the next boundary
    monitor: RunMonitor | None = None        # kNN and embedding figures (fastssl/monitor.py)


def _dump_non_finite(*, directory: Path, batch, loss, method: Method, step: int, rank: int) -> Path:
    path = directory / f"nan_dump_rank{rank}_step{step}.torch"
    path.parent.mkdir(parents=True, exist_ok=True)
    debug = method.debug_tensors()
    outputs = debug.pop("outputs", None)
    torch.save({"step": step, "loss": loss.detach().cpu(), "crops": [c.detach().cpu() for c in batch.crops],
                "indices": batch.indices.cpu(), "outputs": _to_cpu(outputs),
                "method": {k: v.cpu() for k, v in debug.items()}}, path)
    return path


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class MetricsWindow:
    """Running sums on the device between two log reads (the only host syncs of the step)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        detached = loss.detach().float()
        self.loss_sum += detached
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(detached),
                                          torch.full_like(self.first_bad_step, step), self.first_bad_step)
        self.steps += 1

    def read(self) -> tuple[int, float, float, float]:
        """(first non-finite step or -1, mean loss over ranks, seconds, data-wait seconds); then resets."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.loss_sum)  # the logged loss is the mean over ranks
            self.loss_sum /= torch.distributed.get_world_size()
        bad = int(self.first_bad_step)  # sync: once per log period
        mean_loss = float(self.loss_sum) / self.steps  # sync: log
        elapsed, wait = time.perf_counter() - self.start, self.wait
        self.loss_sum.zero_()
        self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0
        return bad, mean_loss, elapsed, wait


def optimizer_step(*, loss: torch.Tensor, model: nn.Module, method: Method, optimizer, scaler, step: int,
                   frozen_params: list) -> None:
    """Backward, the frozen parameters' gradients dropped, the method's hooks around the optimizer step."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    for params, until_step in frozen_params:
        if step < until_step:  # frozen: no update and no weight decay (SGD skips grad None)
            for p in params:
                p.grad = None
    method.before_step(step=step, model=model)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(step=step, model=model)


def train(*, model: nn.Module, trained_model: nn.Module, method: Method, optimizer, scaler, loader,
          state: TrainState, settings: LoopSettings, checkpoint: TrainingCheckpoint, logger: RunLogger) -> TrainState:
    """Run from ``state`` to the end of training; returns the final state.

    ``model`` is the plain module; ``trained_model`` is what the method's step runs (the same module, or
    its DDP / compiled wrapper). ``checkpoint`` saves the run (and is where a non-finite loss dumps).
    """
    device = next(model.parameters()).device
    total_steps = settings.num_epochs * settings.steps_per_epoch
    autocast = (torch.autocast(device_type=device.type, dtype=settings.autocast_dtype)
                if settings.autocast_dtype is not None else contextlib.nullcontext())
    window = MetricsWindow(device)

    for epoch in range(state.epoch, settings.num_epochs):
        # ---------------- epoch start -------------------------------------------------------
        loader.set_epoch(epoch, start_batch=state.batch_in_epoch)
        method.on_epoch_start(epoch=epoch, model=model, loader=loader)
        method.set_train_mode(trained_model)
        batches = iter(loader)
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window.wait += time.perf_counter() - wait_start
            if batch is None:
                break
            step = state.step
            for group in optimizer.param_groups:  # a plain float in the checkpoint; lr_scale: the head's multiplier
                group["lr"] = float(settings.lr_schedule[step]) * group.get("lr_scale", 1.0)

            # ---------------- the method's step, backward, optimizer ---------------------------
            with autocast:
                loss = method.training_loss(trained_model, batch, step=step)
            optimizer_step(loss=loss, model=model, method=method, optimizer=optimizer, scaler=scaler, step=step,
                           frozen_params=settings.frozen_params)
            window.add(loss, step)
            state.step += 1
            state.batch_in_epoch += 1
            end_of_epoch = state.batch_in_epoch == settings.steps_per_epoch

            # ---------------- log (device-side sums read once per period) ---------------------
            if window.steps == settings.log_frequency or end_of_epoch or state.step == total_steps:
                _log_period(window, step=step, epoch=epoch, end_of_epoch=end_of_epoch, batch=batch, loss=loss,
                            method=method, settings=settings, checkpoint=checkpoint, logger=logger,
                            steps_done=state.step)

            # ---------------- checkpoint -------------------------------------------------------
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = epoch + 1, 0
            stop = settings.stop_requested is not None and settings.stop_requested()
            stop = stop or (settings.monitor is not None and settings.monitor.collapse_stop)
            if stop or _checkpoint_due(settings, state, epoch=epoch, end_of_epoch=end_of_epoch):
                path = checkpoint.save(state)  # every rank reaches this together (same conditions)
                if path is not None:
                    logger.info(f"fastssl: saved checkpoint {path}")
            if stop:
                why = "the embedding collapsed" if settings.monitor is not None and settings.monitor.collapse_stop \
                    else "stop requested"
                logger.info(f"fastssl: {why}; stopped at step {state.step}")
                return state
            if end_of_epoch:
                break
        if state.epoch == epoch:  # the loader ran dry before steps_per_epoch batches
            state.epoch, state.batch_in_epoch = epoch + 1, 0
    return state


def _log_period(window: MetricsWindow, *, step: int, epoch: int, end_of_epoch: bool, batch, loss: torch.Tensor,
                method: Method, settings: LoopSettings, checkpoint: TrainingCheckpoint, logger: RunLogger,
                steps_done: int) -> None:
    """Read the period's device-side sums and the monitor's figures (at the end of an epoch, the kNN on the
    held-out split where it is due) and log them; a non-finite loss dumps the step's tensors and raises."""
    steps_in_window = window.steps
    bad, mean_loss, elapsed, wait = window.read()
    if bad >= 0:
        dump = _dump_non_finite(directory=checkpoint.directory, batch=batch, loss=loss, method=method, step=step,
                                rank=settings.rank)
        raise NonFiniteLossError(
            f"loss became non-finite at step {bad} (seen at step {step}); inputs and outputs of step "
            f"{step} written to {dump}; {_last_good(checkpoint)}")
    record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": float(settings.lr_schedule[step]),
              "images_per_s": settings.images_per_step * steps_in_window / elapsed,
              "data_wait_share": wait / elapsed, "seconds_per_step": elapsed / steps_in_window}
    if settings.monitor is not None:
        record.update(settings.monitor.log_figures())
        if end_of_epoch:
            record.update(settings.monitor.knn_figures(epoch=epoch))
            window.start = time.perf_counter()  # the next period's images/s leaves the kNN pass out
    logger.log(record, steps_done=steps_done)
    if settings.monitor is not None:
        settings.monitor.check_collapse(record, logger)


def _checkpoint_due(settings: LoopSettings, state: TrainState, *, epoch: int, end_of_epoch: bool) -> bool:
    if end_of_epoch and ((epoch + 1) % settings.checkpoint_every_epochs == 0 or epoch + 1 == settings.num_epochs):
        return True
    return settings.checkpoint_every_steps > 0 and state.step % settings.checkpoint_every_steps == 0
