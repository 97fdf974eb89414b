"""SwAV: swapped prediction of Sinkhorn cluster assignments (Caron et al. 2020; seed swav.txt).

The head (``swav_head``) lives in the model; this file holds the loss, the embedding queue and the
prototype normalisation. Semantics are VISSL's ``swav_loss``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sinkhorn import sinkhorn
from loaders.batch import Batch

from .base import Method, RunInfo


def rounded_queue_length(queue_length: int, *, global_batch_size: int) -> int:
    """The queue rounded down to whole global batches (VISSL's infer_losses_config); split evenly over ranks."""
    return queue_length - queue_length % global_batch_size


def _host_memory_bytes() -> int:
    """This machine's physical memory: the queue is built on the host first."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class SwAV(Method):
    monitors_embedding = True  # its first head's output is the embedding (fastssl/monitor.py)
    rank_local_state = ("queue",)  # each rank queues its own past embeddings

    def __init__(self, *, temperature: float, epsilon: float, num_iters: int, crops_for_assign: list[int],
                 num_crops: int, num_prototypes: list[int], embedding_dim: int, use_double_precision: bool,
                 temp_hard_assignment_iters: int, normalize_last_layer: bool, queue_start_iter: int,
                 local_queue_length: int, process_group=None):
        super().__init__()
        if max(crops_for_assign) >= num_crops:
            raise ValueError(f"swav_loss.crops_for_assign {crops_for_assign} names a crop beyond num_crops={num_crops}")
        self.temperature = temperature
        self.epsilon = epsilon
        self.num_iters = num_iters
        self.crops_for_assign = list(crops_for_assign)
        self.num_crops = num_crops
        self.num_prototypes = list(num_prototypes)
        self.use_double_precision = use_double_precision
        self.temp_hard_assignment_iters = temp_hard_assignment_iters
        self.normalize_last_layer = normalize_last_layer
        self.queue_start_iter = queue_start_iter
        self.local_queue_length = local_queue_length
        self.process_group = process_group
        self._bound: tuple = ()  # (prototypes ModuleList,): a plain tuple so they stay out of state_dict
        self._debug: dict = {}
        # The queue holds past embeddings of the assigned crops, uniform init as in VISSL; they are
        # scored with the current prototypes at every step (section 4.3 of the paper, "small batches").
        queue_bytes = 4 * len(crops_for_assign) * local_queue_length * embedding_dim
        if queue_bytes > _host_memory_bytes() // 4:
            raise ValueError(f"swav_loss.queue: {local_queue_length} x {len(crops_for_assign)} crops x {embedding_dim} "
                             f"dims per rank is {queue_bytes / 2**30:.1f} GiB, more than a quarter of this machine's "
                             f"{_host_memory_bytes() / 2**30:.1f} GiB of memory")
        stdv = 1.0 / math.sqrt(embedding_dim / 3)
        queue = (torch.rand(len(crops_for_assign), local_queue_length, embedding_dim) * 2 - 1) * stdv
        self.register_buffer("queue", queue)  # (num_assigned_crops, local_queue_length, D)

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "SwAV":
        """LOSS.swav_loss plus the values VISSL infers: num_crops from the transforms, embedding_dim and
        num_prototypes from the swav_head, the queue rounded down to whole global batches."""
        head_name, head = run.head_params[-1]
        if head_name != "swav_head":
            raise ValueError("swav_loss needs a swav_head as the last entry of MODEL.HEAD.PARAMS")
        queue_length = rounded_queue_length(params["queue"]["queue_length"], global_batch_size=run.global_batch_size)
        return cls(temperature=params["temperature"], epsilon=params["epsilon"], num_iters=params["num_iters"],
                   crops_for_assign=params["crops_for_assign"], num_crops=run.num_crops,
                   num_prototypes=list(head["num_clusters"]), embedding_dim=head["dims"][-1],
                   use_double_precision=params["use_double_precision"],
                   temp_hard_assignment_iters=params["temp_hard_assignment_iters"],
                   normalize_last_layer=params["normalize_last_layer"],
                   queue_start_iter=params["queue"]["start_iter"],
                   local_queue_length=queue_length // run.world_size, process_group=run.process_group)

    def bind(self, model: nn.Module) -> None:
        head = model.heads[-1]
        if not hasattr(head, "prototypes"):
            raise ValueError("swav_loss needs a swav_head as the last entry of MODEL.HEAD.PARAMS")
        self._bound = (head.prototypes,)
        self.normalize_prototypes()

    @property
    def prototypes(self) -> nn.ModuleList:
        return self._bound[0]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        if self.normalize_last_layer:
            for layer in self.prototypes:
                layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def after_step(self, *, step: int, model: nn.Module) -> None:
        self.normalize_prototypes()

    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        embedding, all_scores = outputs  # (num_crops * B, D), list of (num_crops * B, K_h)
        batch_size = batch.batch_size
        use_queue = self.local_queue_length > 0 and step >= self.queue_start_iter
        hard = step < self.temp_hard_assignment_iters
        total = 0.0
        for head_id, scores in enumerate(all_scores):
            total = total + self._head_loss(scores, head_id, batch_size, use_queue, hard)
        if use_queue:
            self._push_queue(embedding.detach(), batch_size)
        return total / len(all_scores)

    def _head_loss(self, scores: torch.Tensor, head_id: int, batch_size: int, use_queue: bool,
                   hard: bool) -> torch.Tensor:
        loss_dtype = torch.float64 if self.use_double_precision else torch.float32
        head_loss = 0.0
        for i, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                crop_scores = scores[batch_size * crop_id: batch_size * (crop_id + 1)].detach()
                if use_queue:
                    queue_scores = self.queue[i].to(self.prototypes[head_id].weight.dtype) @ \
                        self.prototypes[head_id].weight.detach().t()  # (L, K)
                    crop_scores = torch.cat((crop_scores, queue_scores.to(crop_scores.dtype)))
                Q = sinkhorn(crop_scores, epsilon=self.epsilon, num_iters=self.num_iters,
                             use_double_precision=self.use_double_precision, group=self.process_group,
                             hard_assignment=hard)[:batch_size]  # (B, K)
            self._debug[f"scores{head_id}"] = scores.detach()
            self._debug[f"assignments{head_id}_{i}"] = Q
            subloss = 0.0
            others = [v for v in range(self.num_crops) if v != crop_id]
            for v in others:
                logits = scores[batch_size * v: batch_size * (v + 1)].to(loss_dtype) / self.temperature
                subloss = subloss - torch.mean(torch.sum(Q.to(loss_dtype) * F.log_softmax(logits, dim=1), dim=1))
            head_loss = head_loss + subloss / len(others)
        return (head_loss / len(self.crops_for_assign)).float()

    @torch.no_grad()
    def _push_queue(self, embedding: torch.Tensor, batch_size: int) -> None:
        for i, crop_id in enumerate(self.crops_for_assign):
            self.queue[i, batch_size:] = self.queue[i, :-batch_size].clone()
            self.queue[i, :batch_size] = embedding[crop_id * batch_size: (crop_id + 1) * batch_size]

    def last_prototype_scores(self) -> torch.Tensor | None:
        return self._debug.get("scores0")

    def debug_tensors(self) -> dict:
        return {**super().debug_tensors(), **self._debug}
