"""Memory banks: NPID's per-sample embedding bank and DeepClusterV2's epoch embedding memory.

NPID (Wu et al. 2018, Sec. 3.2-3.3) keeps one unit-norm embedding per dataset sample, scores each
batch embedding against its own entry and K entries drawn uniformly at random, and after the step
moves the batch's entries towards the new embeddings with momentum m (Eq. 8, proximal update):
    v_i <- normalize(m * v_i + (1 - m) * f_i)
Every per-step function here touches only the B rows of the batch (and the B * K sampled rows),
so its cost is independent of the dataset size N.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.collectives import all_gather_cat, all_reduce_sum, world_size


def init_memory_bank(
    num_samples: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NPID's initial bank: uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3), rows L2-normalised.

    generator: drawn on its own device, then moved to ``device``. Returns (N, D) of ``dtype``.
    """
    stdv = 1.0 / math.sqrt(dim / 3)
    draw_device = generator.device if generator is not None else device
    bank = torch.rand(num_samples, dim, generator=generator, device=draw_device)  # (N, D) in [0, 1)
    bank = bank.mul_(2 * stdv).sub_(stdv)
    return F.normalize(bank, dim=1).to(device=device, dtype=dtype)


@torch.no_grad()
def average_across_ranks(bank: torch.Tensor, group=None) -> torch.Tensor:
    """Replace ``bank`` in place by its mean over the ranks of ``group``, so all ranks start equal."""
    all_reduce_sum(bank, group)
    return bank.div_(world_size(group))


@torch.no_grad()
def update_memory_bank(
    bank: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor, *, momentum: float, group=None
) -> torch.Tensor:
    """Momentum update of the rows of every rank's batch, in place: the same on all ranks.

    bank: (N, D) unit rows, identical on every rank. indices: (B_local,) int64 dataset indices,
    distinct across the global batch. embeddings: (B_local, D), any float dtype (used detached).
    Returns ``bank``.
    """
    # A half-precision bank or batch is updated in float32: m * v + (1 - m) * f loses the step otherwise.
    compute_dtype = torch.promote_types(bank.dtype, torch.float32)
    indices = all_gather_cat(indices, group)  # (B,)
    embeddings = all_gather_cat(embeddings, group).to(compute_dtype)  # (B, D)
    rows = bank.index_select(0, indices).to(compute_dtype)  # (B, D)
    updated = F.normalize(momentum * rows + (1 - momentum) * embeddings, dim=1)  # (B, D)
    return bank.index_copy_(0, indices, updated.to(bank.dtype))


def sample_negatives(
    num_samples: int, batch_size: int, num_negatives: int, *, generator: torch.Generator | None, device
) -> torch.Tensor:
    """Uniform negative indices drawn on ``device``: (B, K) int64 in [0, N).

    generator: must live on ``device`` (or be None for the device's default generator).
    """
    return torch.randint(num_samples, (batch_size, num_negatives), generator=generator, device=device)


def gather_rows(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One indexed read of the bank: bank (N, D), index (B, K) int64 -> (B, K, D)."""
    return bank.index_select(0, index.reshape(-1)).view(*index.shape, bank.shape[1])


@torch.no_grad()
def write_embedding_memory(
    memory: torch.Tensor, local_positions: torch.Tensor, embeddings: torch.Tensor
) -> torch.Tensor:
    """Store a batch's embeddings in DeepClusterV2's per-rank memory, in place.

    memory: (num_crops_mb, N_local, D); local_positions: (B,) int64 rows of this rank's memory;
    embeddings: (num_crops_mb, B, D), any float dtype (used detached). Returns ``memory``.
    """
    return memory.index_copy_(1, local_positions, embeddings.detach().to(memory.dtype))
