"""BYOL: bootstrap your own latent (Grill et al. 2020; seed byol.txt). Key names are those of VISSL's
``byol_loss`` branch (``embedding_dim``, ``momentum``).

The online network is the model: trunk, projector (MODEL.HEAD.PARAMS[0]) and predictor (PARAMS[1]).
The target network is a copy of the trunk and projector kept here, on the method: never in DDP, never
in the optimizer, run under ``no_grad``. Its parameters follow the online ones as an exponential
moving average after every optimizer step, with the paper's cosine rule (section 3.2):

    tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2,   k = 0 .. K (total steps),

so tau goes from ``momentum`` to 1. The EMA covers the parameters only. BatchNorm running statistics
are the target's own: the target runs in training mode (batch statistics, as in the paper and VISSL)
and its running statistics, which training never reads, are updated by its own forward passes.

Loss (section 3.2, Eq. 2): with p = predictor output of the online network and z' = target projection,
both L2-normalised, l(p, z') = ||p - z'||^2 = 2 - 2 cos(p, z'). Each large view predicts the target of
the other one (symmetrised), averaged over the batch; DDP's gradient mean makes it the global batch.
With more crops (multi-crop BYOL), every crop predicts the target of each large view other than itself,
and the pairs are averaged with the weight that keeps the two-view loss as the paper's sum of two terms.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loaders.batch import Batch

from .base import Method, RunInfo, detached

NUM_LARGE_VIEWS = 2  # the paper's two views; further crops are small views that only predict


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z') per row: (B, D), (B, D) -> (B,)."""
    return 2 - 2 * (F.normalize(prediction, dim=1) * F.normalize(target, dim=1)).sum(dim=1)


def target_momentum(step: int, *, base: float, total_steps: int) -> float:
    """tau_k of the cosine rule: ``base`` at step 0, 1 at ``total_steps``."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


class TargetNetwork(nn.Module):
    """The target's trunk and projector, as the online model's forward runs them."""

    def __init__(self, *, trunk: nn.Module, projector: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.projector = projector

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops of one resolution: list of (B, 3, H, W) -> (len(crops) * B, D), crop-major."""
        return self.projector(self.trunk(crops[0] if len(crops) == 1 else torch.cat(crops)))


def copy_for_target(module: nn.Module) -> nn.Module:
    """A deep copy sharing the process groups of SyncBatchNorm layers (a group cannot be copied)."""
    groups = {id(m.process_group): m.process_group for m in module.modules()
              if getattr(m, "process_group", None) is not None}
    return copy.deepcopy(module, memo=dict(groups))


class BYOL(Method):
    monitors_embedding = True  # its first head's output is the embedding (fastssl/monitor.py)

    def __init__(self, *, momentum: float, embedding_dim: int, num_crops: int, total_iterations: int):
        super().__init__()
        if num_crops < NUM_LARGE_VIEWS:
            raise ValueError(f"byol_loss needs at least two views, the transforms make {num_crops} "
                             "(ImgReplicatePil num_times: 2, or ImgPilToMultiCrop)")
        if not 0 <= momentum < 1:
            raise ValueError(f"byol_loss.momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.embedding_dim = embedding_dim
        self.num_crops = num_crops
        self.total_iterations = total_iterations
        # tau at every step, precomputed like the LR schedule (no host work in the step)
        self._taus = np.array([target_momentum(k, base=momentum, total_steps=total_iterations)
                               for k in range(total_iterations + 1)])
        self.target: TargetNetwork | None = None  # built in bind(), from the online model
        self._online: tuple = ()

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "BYOL":
        """LOSS.byol_loss; MODEL.HEAD.PARAMS must be [projector, predictor] whose outputs are embedding_dim."""
        if len(run.head_params) != 2:
            raise ValueError(f"byol_loss needs two heads in MODEL.HEAD.PARAMS (projector, predictor), "
                             f"got {len(run.head_params)}")
        for (name, head), role in zip(run.head_params, ("projector", "predictor")):
            if head["dims"][-1] != params["embedding_dim"]:
                raise ValueError(f"byol_loss.embedding_dim={params['embedding_dim']} but the {role} ({name}) "
                                 f"outputs {head['dims'][-1]}")
        return cls(momentum=params["momentum"], embedding_dim=params["embedding_dim"], num_crops=run.num_crops,
                   total_iterations=run.total_iterations)

    def bind(self, model: nn.Module) -> None:
        """The target: a copy of the online trunk and projector (its weights are set in on_train_start)."""
        online = (model.trunk, model.heads[0])
        self.target = TargetNetwork(trunk=copy_for_target(online[0]), projector=copy_for_target(online[1]))
        self.target.requires_grad_(False)
        self._online = online
        self._pairs = (list(self.target.trunk.parameters()) + list(self.target.projector.parameters()),
                       list(online[0].parameters()) + list(online[1].parameters()))

    @torch.no_grad()
    def on_train_start(self, *, model, loader, fresh_start: bool) -> None:
        """A fresh run's target starts equal to the online network, copied after DDP has given every rank
        rank 0's initial weights (bind() runs before that); a resumed run keeps its checkpointed target."""
        if fresh_start:
            self.target.trunk.load_state_dict(self._online[0].state_dict())
            self.target.projector.load_state_dict(self._online[1].state_dict())

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        self.target.train()  # batch statistics, as the online network

    def training_loss(self, model: nn.Module, batch: Batch, *, step: int) -> torch.Tensor:
        predictions = model(batch.crops)  # (C * B, D): online trunk, projector and predictor
        self._last_outputs = detached(predictions)
        with torch.no_grad():
            targets = self.target(batch.crops[:NUM_LARGE_VIEWS])  # (2 * B, D)
        return self.loss((predictions, targets), batch, step=step)

    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        predictions, targets = outputs
        batch_size = batch.batch_size
        predictions = predictions.float().view(self.num_crops, batch_size, -1)  # (C, B, D)
        targets = targets.float().view(NUM_LARGE_VIEWS, batch_size, -1)  # (2, B, D)
        pairs = [(crop, view) for crop in range(self.num_crops) for view in range(NUM_LARGE_VIEWS) if crop != view]
        total = sum(regression_loss(predictions[crop], targets[view]).mean() for crop, view in pairs)
        return total * NUM_LARGE_VIEWS / len(pairs)  # two views: the paper's l(v, v') + l(v', v)

    @torch.no_grad()
    def after_step(self, *, step: int, model: nn.Module) -> None:
        """target <- tau * target + (1 - tau) * online, one fused operation over all parameters."""
        tau = float(self._taus[min(step, self.total_iterations)])
        target, online = self._pairs
        torch._foreach_lerp_(target, online, 1.0 - tau)
