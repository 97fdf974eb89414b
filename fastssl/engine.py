"""The training loop: one loop for every method, readable top to bottom (STYLE.md, "The loop")."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import rng_state, save_checkpoint, save_rank_state
from .methods.base import Method
from .metrics import RunLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the offending tensors were written to ``dump_path``."""


@dataclass
class TrainState:
    """Where training stands: the next global step to run and its place in the epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class LoopSettings:
    num_epochs: int
    steps_per_epoch: int
    lr_schedule: np.ndarray                  # (total_steps,) learning rate at every global step
    autocast_dtype: torch.dtype | None       # None: full precision
    log_frequency: int
    checkpoint_dir: str
    checkpoint_every_epochs: int
    checkpoint_every_steps: int              # -1: off
    frozen_params: list = field(default_factory=list)  # [(list of parameters, until_step)]
    rank: int = 0
    images_per_step: int = 0                 # global images per step, for images/s
    extra_state: dict = field(default_factory=dict)     # saved as is (config, derived values)
    stop_requested: object = None            # callable -> bool: checkpoint and stop at the next boundary


def _checkpoint_state(*, model, optimizer, scaler, method, state: TrainState, settings: LoopSettings) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "method": method.state_dict(), "rng": rng_state(),
            "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            **settings.extra_state}


def _save_all_ranks(*, model, optimizer, scaler, method, state, settings) -> Path | None:
    """Ranks > 0 write their own method and RNG state (queues, memories, random streams differ per
    rank) beside the checkpoint first; rank 0 writes the checkpoint itself once they all have, so a
    checkpoint file on disk always has its per-rank files."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if settings.rank != 0:
        save_rank_state(settings.checkpoint_dir, {"method": method.state_dict(), "rng": rng_state()},
                        step=state.step, rank=settings.rank)
    if distributed:
        torch.distributed.barrier()
    path = None
    if settings.rank == 0:
        path = save_checkpoint(settings.checkpoint_dir, _checkpoint_state(
            model=model, optimizer=optimizer, scaler=scaler, method=method, state=state, settings=settings),
            step=state.step)
    if distributed:
        torch.distributed.barrier()
    return path


def _dump_non_finite(*, directory: str, batch, outputs, loss, method: Method, step: int, rank: int) -> Path:
    path = Path(directory) / f"nan_dump_rank{rank}_step{step}.torch"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "loss": loss.detach().cpu(), "crops": [c.detach().cpu() for c in batch.crops],
                "indices": batch.indices.cpu(), "outputs": _to_cpu(outputs),
                "method": {k: v.cpu() for k, v in method.debug_tensors().items()}}, path)
    return path


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def train(*, model: nn.Module, trained_model: nn.Module, method: Method, optimizer, scaler, loader,
          state: TrainState, settings: LoopSettings, logger: RunLogger) -> TrainState:
    """Run from ``state`` to the end of training; returns the final state.

    ``model`` is the plain module (checkpointed); ``trained_model`` is what runs the forward (the same
    module, or its DDP / compiled wrapper).
    """
    device = next(model.parameters()).device
    total_steps = settings.num_epochs * settings.steps_per_epoch
    autocast = (torch.autocast(device_type=device.type, dtype=settings.autocast_dtype)
                if settings.autocast_dtype is not None else contextlib.nullcontext())
    loss_sum = torch.zeros((), device=device)           # running sums stay on the device between logs
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

    for epoch in range(state.epoch, settings.num_epochs):
        # ---------------- epoch start -------------------------------------------------------
        loader.set_epoch(epoch, start_batch=state.batch_in_epoch)
        method.on_epoch_start(epoch=epoch, model=model, loader=loader)
        trained_model.train()
        batches = iter(loader)
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            step = state.step
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_schedule[step]

            # ---------------- forward and loss ----------------------------------------------
            with autocast:
                outputs = trained_model(batch.crops)
                loss = method.loss(outputs, batch, step=step)

            # ---------------- backward and step ---------------------------------------------
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            for params, until_step in settings.frozen_params:
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

            # ---------------- bookkeeping (device-side until the log period) ---------------
            detached = loss.detach().float()
            loss_sum += detached
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(detached),
                                         torch.full_like(first_bad_step, step), first_bad_step)
            state.step += 1
            state.batch_in_epoch += 1
            window_steps += 1
            end_of_epoch = state.batch_in_epoch == settings.steps_per_epoch

            if window_steps == settings.log_frequency or end_of_epoch or state.step == total_steps:
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(loss_sum)  # the logged loss is the mean over ranks
                    loss_sum /= torch.distributed.get_world_size()
                bad = int(first_bad_step)  # sync: once per log period
                if bad >= 0:
                    dump = _dump_non_finite(directory=settings.checkpoint_dir, batch=batch, outputs=outputs,
                                            loss=loss, method=method, step=step, rank=settings.rank)
                    raise NonFiniteLossError(
                        f"loss became non-finite at step {bad} (seen at step {step}); inputs and outputs of step "
                        f"{step} written to {dump}; the last good checkpoint in {settings.checkpoint_dir} is intact")
                elapsed = time.perf_counter() - window_start
                logger.log({"step": step, "epoch": epoch, "loss": float(loss_sum) / window_steps,  # sync: log
                            "lr": float(settings.lr_schedule[step]),
                            "images_per_s": settings.images_per_step * window_steps / elapsed,
                            "data_wait_share": window_wait / elapsed,
                            "seconds_per_step": elapsed / window_steps}, steps_done=state.step)
                loss_sum.zero_()
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

            # ---------------- checkpoint -------------------------------------------------------
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = epoch + 1, 0
            stop = settings.stop_requested is not None and settings.stop_requested()
            if (stop
                    or (end_of_epoch and ((epoch + 1) % settings.checkpoint_every_epochs == 0
                                          or epoch + 1 == settings.num_epochs))
                    or (settings.checkpoint_every_steps > 0 and state.step % settings.checkpoint_every_steps == 0)):
                # Every rank reaches this together (the conditions are the same on all ranks).
                path = _save_all_ranks(model=model, optimizer=optimizer, scaler=scaler, method=method, state=state,
                                       settings=settings)
                if path is not None:
                    logger.info(f"fastssl: saved checkpoint {path}")
            if stop:
                logger.info(f"fastssl: stop requested; stopped at step {state.step}")
                return state
            if end_of_epoch:
                break
        if state.epoch == epoch:  # the loader ran dry before steps_per_epoch batches
            state.epoch, state.batch_in_epoch = epoch + 1, 0
    return state
