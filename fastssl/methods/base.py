"""The method interface: the training step, the state and the hooks one SSL method needs (STYLE.md)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from loaders.batch import Batch


@dataclass(frozen=True)
class RunInfo:
    """Values derived once by the run builder (fastssl/builder.py) that a method may need to build itself."""

    rank: int
    world_size: int
    batch_size_per_replica: int
    global_batch_size: int
    num_crops: int
    num_train_samples: int
    iterations_per_epoch: int
    total_iterations: int
    device: torch.device
    head_params: list                          # MODEL.HEAD.PARAMS as built, for values a loss infers from it
    drop_last: bool
    autocast_dtype: torch.dtype | None = None  # the loop's autocast, for passes a method runs outside the step
    process_group: object | None = None
    label_paths: tuple[str, ...] = ()          # DATA.TRAIN.LABEL_PATHS: per-sample label files (ClusterFit)

    def autocast(self):
        """The loop's autocast context, for a forward pass a method runs itself (DeepClusterV2's memory fill)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def detached(value):
    """Tensors (in lists and tuples) cut from the graph, kept for a non-finite-loss dump."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(detached(v) for v in value)
    return value


class Method(nn.Module):
    """Base class: every hook is a no-op; ``state_dict`` holds the method's buffers (queues, banks, ...).

    The loop calls, in order: ``on_train_start`` once; at each epoch ``on_epoch_start`` then
    ``set_train_mode``; per step ``training_loss`` (under the loop's autocast) -> backward ->
    ``before_step`` -> optimizer step -> ``after_step``. The entry point calls ``on_train_end`` once
    training has finished.

    State: buffers named in ``rank_local_state`` (or starting with one of those names) differ per rank
    (SwAV's queue, DeepClusterV2's memory) and are saved by every rank beside the checkpoint; the rest
    (NPID's bank, cluster assignments, a target network) is the same on every rank and saved once.
    """

    rank_local_state: tuple[str, ...] = ()
    monitors_embedding = False  # the first head's output is an embedding (not class scores): its rank is watched

    def bind(self, model: nn.Module) -> None:
        """Called once with the (unwrapped) model, before training; methods keep what they need from it."""

    def on_train_start(self, *, model: nn.Module, loader, fresh_start: bool) -> None:
        """Before the first step of this process (fresh or resumed)."""

    def on_train_end(self, *, model: nn.Module, test_loader) -> dict | None:
        """After the last step (not after a stop by a signal), on every rank, with the plain model and this
        rank's shard of the held-out split (None without TEST_MODEL). Returns final metrics {name: number}
        (the same on every rank), which the entry point prints and logs, or None."""
        return None

    def on_epoch_start(self, *, epoch: int, model: nn.Module, loader) -> None:
        """At the start of every epoch (DeepClusterV2 clusters here)."""

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the trained model in training mode for the epoch; a method with a frozen part keeps that
        part in eval mode here (its BatchNorm statistics then stay as loaded)."""
        model.train()

    def training_loss(self, model: nn.Module, batch: Batch, *, step: int) -> torch.Tensor:
        """One step's loss: the forward over the batch's crops, then ``loss``. ``model`` is what the loop
        trains (the module or its DDP / compiled wrapper). A method that must do more around the forward
        (rotate the inputs, run a target network) overrides this."""
        outputs = model(batch.crops)
        self._last_outputs = detached(outputs)
        return self.loss(outputs, batch, step=step)

    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        raise NotImplementedError

    def before_step(self, *, step: int, model: nn.Module) -> None:
        """After backward, before the optimizer step (gradient surgery)."""

    def after_step(self, *, step: int, model: nn.Module) -> None:
        """After the optimizer step (normalise prototypes, update EMA targets)."""

    def split_state_dict(self) -> tuple[dict, dict]:
        """(state shared by every rank, this rank's own state) of ``state_dict()``."""
        shared, local = {}, {}
        for key, value in self.state_dict().items():
            own = any(key == name or key.startswith(name + ".") for name in self.rank_local_state)
            (local if own else shared)[key] = value
        return shared, local

    def describe(self) -> dict:
        """The method's settings (inferred ones included) and its state's shapes, for the start-up log."""
        simple = (bool, int, float, str)
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_") and (
            isinstance(v, simple) or (isinstance(v, list) and all(isinstance(x, simple) for x in v)))}
        settings.pop("training", None)
        # The method's own buffers by shape; a network it holds (BYOL's target) as one count, not its
        # every BatchNorm statistic.
        buffers = {f"{name}.shape": tuple(buffer.shape) for name, buffer in self.named_buffers(recurse=False)}
        networks = {name: f"{sum(p.numel() for p in child.parameters()):,} parameters, "
                          f"{len(list(child.buffers()))} buffers" for name, child in self.named_children()}
        return {**settings, **buffers, **networks}

    def last_prototype_scores(self) -> torch.Tensor | None:
        """(rows, K) scores of the last step's rows against the prototypes (SwAV, DeepClusterV2), for the
        count of prototypes in use (fastssl/monitor.py); None for a method without prototypes."""
        return None

    def debug_tensors(self) -> dict:
        """Tensors worth saving when the loss goes non-finite: the last step's outputs, and what a method
        adds (scores, assignments)."""
        outputs = getattr(self, "_last_outputs", None)
        return {} if outputs is None else {"outputs": outputs}
