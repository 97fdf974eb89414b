"""Distributed Sinkhorn-Knopp: equipartitioned soft cluster assignments (SwAV, Caron et al. 2020).

SwAV (Sec. 3.1 and Appendix A.1) computes codes Q = Diag(u) exp(C^T Z / epsilon) Diag(v) whose
rows (prototypes) each carry mass 1/K and whose columns (samples) each carry mass 1/B, with B the
batch summed over all ranks. The scaling vectors come from a few alternating normalisations:

    Q = exp(scores / epsilon).T  # (K, B), then normalised to total mass 1
    repeat num_iters times:
        Q *= (1 / K) / Q.sum(1)    # rows; the sum runs over every rank's batch
        Q *= (1 / B) / Q.sum(0)    # columns; local
    return (Q / Q.sum(0)).T        # (B, K), each sample's codes sum to 1

The iteration runs in the log domain: the same iterates up to rounding, but a row or column whose
entries all sit far below the maximum cannot underflow to zero and turn into NaN, which the linear
form does in fp32 once (max - min) / epsilon exceeds about 87. The global scale normalisation
(total mass 1) is a constant that the first row normalisation absorbs, and so is any constant
added to the scores: the result is invariant to both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.collectives import all_reduce_max, all_reduce_sum, world_size


def _global_row_logsumexp(log_Q: torch.Tensor, group) -> torch.Tensor:
    """log(sum_b exp(log_Q[k, b])) with b running over the batches of every rank.

    log_Q: (K, B_local). Returns (K, 1). The per-row maximum is all-reduced first so that the
    exponent never exceeds 0 on any rank, then the shifted sums are all-reduced.
    """
    row_max = all_reduce_max(log_Q.amax(dim=1, keepdim=True), group)  # (K, 1)
    row_sum = all_reduce_sum(torch.exp(log_Q - row_max).sum(dim=1, keepdim=True), group)  # (K, 1)
    return row_max + row_sum.log()


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    *,
    epsilon: float,
    num_iters: int,
    use_double_precision: bool = False,
    hard_assignment: bool = False,
    group=None,
) -> torch.Tensor:
    """Equipartitioned assignment of a batch of samples to K prototypes.

    scores: (B_local, K) prototype scores of this rank's samples, any float dtype. Every rank
        holds the same B_local; the batch that is equipartitioned is all ranks' samples together.
    epsilon: entropy regularisation; smaller is closer to a hard assignment.
    num_iters: Sinkhorn iterations (row then column normalisation each).
    use_double_precision: iterate in float64 instead of float32 (the input dtype is never used:
        bf16/fp16 scores are upcast before dividing by epsilon).
    hard_assignment: return one-hot rows at the argmax of the soft codes (VISSL's
        temp_hard_assignment_iters phase).
    group: process group to equipartition over; None is the default group (a no-op on one process).

    Returns (B_local, K) codes in float32 (float64 with use_double_precision), detached, each row
    summing to 1.
    """
    compute_dtype = torch.float64 if use_double_precision else torch.float32
    batch_size_local, num_prototypes = scores.shape
    batch_size_global = batch_size_local * world_size(group)
    log_K = math.log(num_prototypes)
    log_B = math.log(batch_size_global)

    log_Q = scores.detach().to(compute_dtype).t() / epsilon  # (K, B_local)
    for _ in range(num_iters):
        # Rows: each prototype receives mass 1/K from the global batch.
        log_Q -= _global_row_logsumexp(log_Q, group) + log_K
        # Columns: each sample spreads mass 1/B over the prototypes.
        log_Q -= torch.logsumexp(log_Q, dim=0, keepdim=True) + log_B
    # Final column normalisation to 1: a per-sample softmax over prototypes.
    Q = torch.softmax(log_Q, dim=0).t()  # (B_local, K)
    if hard_assignment:
        Q = F.one_hot(Q.argmax(dim=1), num_prototypes).to(compute_dtype)  # (B_local, K)
    return Q
