"""NPID and NPID++: non-parametric instance discrimination against a memory bank (Wu et al. 2018; Misra &
van der Maaten 2019 for NPID++; seed npid.txt). Semantics are VISSL's ``nce_loss_with_memory``.

The bank holds one unit embedding per dataset sample. Each crop's embedding f_i is scored against
its own bank row (the positive) and K rows drawn uniformly (the negatives): s = <v, f_i> / T. Then

    nce (Eq. 4-6 of NPID):  P = exp(s) / Z,  noise probability 1/N,
        loss = -log(P_pos / (P_pos + K/N)) - sum_k log((K/N) / (P_neg_k + K/N)), averaged over the batch;
    cross_entropy (InfoNCE): softmax cross-entropy of s with the positive as the class.

Z is norm_constant, or (-1) estimated once from the first batch, N * mean(exp(s)) averaged over
ranks, then fixed (NPID Sec. 3.2). After scoring, the batch's bank rows move towards the new
embeddings with momentum (Eq. 8), gathered from every rank so all banks stay equal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.collectives import all_reduce_sum, world_size
from kernels.memory_bank import (average_across_ranks, gather_rows, init_memory_bank, sample_negatives,
                                 update_memory_bank)
from loaders.batch import Batch

from .base import Method, RunInfo


class NPID(Method):
    monitors_embedding = True  # its first head's output is the embedding (fastssl/monitor.py)

    def __init__(self, *, loss_type: str, norm_embedding: bool, temperature: float, loss_weights: list[float],
                 norm_constant: float, update_mem_with_emb_index: int, num_negatives: int, memory_size: int,
                 embedding_dim: int, momentum: float, norm_init: bool, update_mem_on_forward: bool,
                 num_train_samples: int, num_crops: int, device: torch.device | str, process_group=None):
        super().__init__()
        if loss_type not in ("nce", "cross_entropy"):
            raise ValueError(f"nce_loss_with_memory.loss_type must be nce or cross_entropy, got {loss_type!r}")
        if len(loss_weights) != num_crops:
            raise ValueError(f"nce_loss_with_memory.loss_weights {list(loss_weights)} needs one weight per crop "
                             f"({num_crops} crops): each crop is scored against the memory bank")
        if not update_mem_on_forward and not 0 <= update_mem_with_emb_index < num_crops:
            raise ValueError(f"nce_loss_with_memory: with memory_params.update_mem_on_forward False, "
                             f"update_mem_with_emb_index ({update_mem_with_emb_index}) must name the crop "
                             f"(0..{num_crops - 1}) whose embedding updates the bank")
        if memory_size not in (-1, num_train_samples):
            raise ValueError(f"nce_loss_with_memory.memory_params.memory_size must be -1 or the dataset size "
                             f"{num_train_samples} (one row per sample), got {memory_size}")
        self.loss_type = loss_type
        self.norm_embedding = norm_embedding
        self.temperature = temperature
        self.loss_weights = list(loss_weights)
        self.update_mem_with_emb_index = update_mem_with_emb_index
        self.num_negatives = num_negatives
        self.momentum = momentum
        self.norm_init = norm_init
        self.update_mem_on_forward = update_mem_on_forward
        self.num_train_samples = num_train_samples
        self.num_crops = num_crops
        self.process_group = process_group
        self.norm_constant_known = norm_constant > 0  # extra state: Z fixed (given, or estimated already)
        self._debug: dict = {}
        self.register_buffer("bank", self._initial_bank(num_train_samples, embedding_dim, device))  # (N, D)
        self.register_buffer("norm_constant", torch.tensor(float(norm_constant), device=device))  # Z, ()

    def _initial_bank(self, num_samples: int, dim: int, device) -> torch.Tensor:
        if self.norm_init:
            return init_memory_bank(num_samples, dim, device=device)
        # Uniform in [-stdv, stdv] as init_memory_bank draws it, without the normalisation.
        stdv = 1.0 / math.sqrt(dim / 3)
        return torch.rand(num_samples, dim, device=device).mul_(2 * stdv).sub_(stdv)

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "NPID":
        """LOSS.nce_loss_with_memory; num_train_samples and num_crops come from the run (inferred)."""
        memory, sampling = params["memory_params"], params["negative_sampling_params"]
        head_name, head = run.head_params[-1]
        if head["dims"][-1] != memory["embedding_dim"]:
            raise ValueError(f"nce_loss_with_memory.memory_params.embedding_dim={memory['embedding_dim']} but the "
                             f"last head ({head_name}) outputs {head['dims'][-1]}")
        if sampling["type"] != "random":
            raise ValueError(f"nce_loss_with_memory.negative_sampling_params.type must be random, "
                             f"got {sampling['type']!r}")
        return cls(loss_type=params["loss_type"], norm_embedding=params["norm_embedding"],
                   temperature=params["temperature"], loss_weights=list(params["loss_weights"]),
                   norm_constant=params["norm_constant"], update_mem_with_emb_index=params["update_mem_with_emb_index"],
                   num_negatives=sampling["num_negatives"], memory_size=memory["memory_size"],
                   embedding_dim=memory["embedding_dim"], momentum=memory["momentum"], norm_init=memory["norm_init"],
                   update_mem_on_forward=memory["update_mem_on_forward"], num_train_samples=run.num_train_samples,
                   num_crops=run.num_crops, device=run.device, process_group=run.process_group)

    def get_extra_state(self) -> dict:
        return {"norm_constant_known": self.norm_constant_known}

    def set_extra_state(self, state: dict) -> None:
        self.norm_constant_known = state["norm_constant_known"]

    @torch.no_grad()
    def on_train_start(self, *, model, loader, fresh_start: bool) -> None:
        if fresh_start:  # every rank drew its own bank: start from their mean (a resumed bank is equal already)
            # Not normalised again, as VISSL's sync_memory: on W ranks the rows start with norm ~ 1/sqrt(W), and
            # so do the first batch's scores and Z, estimated from them and fixed for the run.
            average_across_ranks(self.bank, self.process_group)

    # ---------------- loss -------------------------------------------------------------------
    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        embedding = outputs[0] if isinstance(outputs, (tuple, list)) else outputs  # (C * B, D), crop-major
        batch_size = batch.batch_size
        total = 0.0
        for crop, weight in enumerate(self.loss_weights):
            crop_embedding = embedding[crop * batch_size:(crop + 1) * batch_size].float()  # (B, D)
            if self.norm_embedding:
                crop_embedding = F.normalize(crop_embedding, dim=1)
            scores = self.scores(crop_embedding, batch.indices)  # (B, 1 + K)
            self._debug[f"scores{crop}"] = scores.detach()
            crop_loss = self.nce(scores) if self.loss_type == "nce" else F.cross_entropy(
                scores, torch.zeros(batch_size, dtype=torch.long, device=scores.device))
            total = total + weight * crop_loss
            if self.update_mem_on_forward or crop == self.update_mem_with_emb_index:
                update_memory_bank(self.bank, batch.indices, crop_embedding.detach(), momentum=self.momentum,
                                   group=self.process_group)
        return total

    def scores(self, embedding: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """<bank row, f> / T for the positive (column 0) and K uniform negatives: (B, D) -> (B, 1 + K)."""
        negatives = sample_negatives(self.num_train_samples, indices.shape[0], self.num_negatives,
                                     generator=None, device=indices.device)  # (B, K)
        rows = gather_rows(self.bank, torch.cat((indices.unsqueeze(1), negatives), dim=1))  # (B, 1 + K, D)
        return torch.bmm(rows, embedding.unsqueeze(2)).squeeze(2) / self.temperature

    def nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NPID's NCE loss (Eq. 6) from scores s = <v, f> / T: (B, 1 + K) -> ()."""
        if not self.norm_constant_known:
            self.estimate_norm_constant(scores)
        # log P = s - log Z; -log(P / (P + c)) = softplus(log c - log P), -log(c / (P + c)) = softplus(log P - log c)
        log_p = scores - torch.log(self.norm_constant)  # (B, 1 + K)
        log_noise = math.log(self.num_negatives / self.num_train_samples)  # log(K * P_noise), P_noise = 1/N
        positive = F.softplus(log_noise - log_p[:, 0])  # (B,)
        negative = F.softplus(log_p[:, 1:] - log_noise).sum(dim=1)  # (B,)
        return (positive + negative).mean()

    @torch.no_grad()
    def estimate_norm_constant(self, scores: torch.Tensor) -> None:
        """Z = N * mean(exp(s)) over this batch, averaged over ranks; fixed from then on (no host sync)."""
        batch_mean = torch.exp(scores).mean()
        all_reduce_sum(batch_mean, self.process_group)
        self.norm_constant.copy_(batch_mean / world_size(self.process_group) * self.num_train_samples)
        self.norm_constant_known = True

    def debug_tensors(self) -> dict:
        return {**super().debug_tensors(), **self._debug, "norm_constant": self.norm_constant}
