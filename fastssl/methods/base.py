"""The method interface: a loss plus the state and hooks one SSL method needs (STYLE.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loaders.batch import Batch


@dataclass
class RunInfo:
    """Values derived once by the entry point that a method may need to build itself."""

    rank: int
    world_size: int
    batch_size_per_replica: int
    global_batch_size: int
    num_crops: int
    num_train_samples: int
    iterations_per_epoch: int
    total_iterations: int
    output_dir: str
    device: torch.device
    head_params: list = field(default_factory=list)  # MODEL.HEAD.PARAMS, for values a loss infers from it
    drop_last: bool = True
    process_group: object | None = None
    extras: dict = field(default_factory=dict)


class Method(nn.Module):
    """Base class: every hook is a no-op; ``state_dict`` holds the method's buffers (queues, banks, ...).

    The loop calls, in order: ``on_train_start`` once, ``on_epoch_start`` at each epoch, and per step
    ``loss`` -> backward -> ``before_step`` -> optimizer step -> ``after_step``.
    """

    def bind(self, model: nn.Module) -> None:
        """Called once with the (unwrapped) model, before training; methods keep what they need from it."""

    def on_train_start(self, *, model: nn.Module, loader, fresh_start: bool) -> None:
        """Before the first step of this process (fresh or resumed)."""

    def on_epoch_start(self, *, epoch: int, model: nn.Module, loader) -> None:
        """At the start of every epoch (DeepClusterV2 clusters here)."""

    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        raise NotImplementedError

    def before_step(self, *, step: int, model: nn.Module) -> None:
        """After backward, before the optimizer step (gradient surgery)."""

    def after_step(self, *, step: int, model: nn.Module) -> None:
        """After the optimizer step (normalise prototypes, update EMA targets)."""

    def describe(self) -> dict:
        """The method's settings (inferred ones included) and its state's shapes, for the start-up log."""
        simple = (bool, int, float, str)
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_") and (
            isinstance(v, simple) or (isinstance(v, list) and all(isinstance(x, simple) for x in v)))}
        settings.pop("training", None)
        return {**settings, **{f"{name}.shape": tuple(buffer.shape) for name, buffer in self.named_buffers()}}

    def debug_tensors(self) -> dict:
        """Tensors worth saving when the loss goes non-finite (scores, assignments)."""
        return {}
