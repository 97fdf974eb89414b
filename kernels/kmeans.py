"""Distributed spherical k-means, as DeepClusterV2 runs it on its embedding memory each epoch.

For each clustering head: centroids start as K distinct embeddings drawn on rank 0 and broadcast;
then num_iters rounds of
    E-step: assign each embedding to the centroid of largest dot product (chunked matmul + argmax);
    M-step: centroid = normalize(sum of its embeddings over all ranks / their count), a cluster
            that received nothing keeps its previous centroid;
and a last E-step against the final centroids gives the returned assignments. The M-step is two
index_add_ calls (sums and counts), all-reduced: no loop over clusters and no host round trip.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.collectives import all_reduce_sum, broadcast, rank

# Rows of the (rows, K) score matrix materialised at once by the E-step: bounds its memory to
# rows * K * 4 bytes (0.8 GB at K=3,000) whatever the size of the memory.
ASSIGN_CHUNK_ROWS = 65536


def _assign_into(
    embeddings: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """E-step writing into preallocated buffers, so repeated calls do not re-allocate (and, on
    the CPU, re-fault) a large score matrix. scores: (chunk_rows, K) scratch; assignments: (N,)."""
    chunk_rows = scores.shape[0]
    for start in range(0, embeddings.shape[0], chunk_rows):
        chunk = embeddings[start : start + chunk_rows]  # (n, D)
        chunk_scores = scores[: chunk.shape[0]]  # (n, K)
        torch.mm(chunk, centroids.t(), out=chunk_scores)
        assignments[start : start + chunk.shape[0]] = chunk_scores.argmax(dim=1)
    return assignments


def assign(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the centroid with the largest dot product for each embedding.

    embeddings: (N, D); centroids: (K, D), same dtype. Returns (N,) int64.
    """
    num_rows = min(embeddings.shape[0], ASSIGN_CHUNK_ROWS)
    scores = embeddings.new_empty(num_rows, centroids.shape[0])  # (chunk, K)
    assignments = torch.empty(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
    return _assign_into(embeddings, centroids, assignments, scores)


def sample_initial_centroids(
    embeddings: torch.Tensor, *, num_clusters: int, generator: torch.Generator | None = None, group=None
) -> torch.Tensor:
    """K distinct rows of rank 0's embeddings, broadcast to every rank.

    embeddings: (N_local, D) with N_local >= K (equal on every rank).
    generator: draws the picks; only rank 0's is consumed.
    Returns (K, D) float32.
    """
    if embeddings.shape[0] < num_clusters:
        raise ValueError(f"k-means needs at least {num_clusters} embeddings per rank, got {embeddings.shape[0]}")
    centroids = torch.empty(num_clusters, embeddings.shape[1], device=embeddings.device)  # (K, D)
    if rank(group) == 0:
        device = generator.device if generator is not None else embeddings.device
        picks = torch.randperm(embeddings.shape[0], generator=generator, device=device)[:num_clusters]
        centroids.copy_(embeddings[picks.to(embeddings.device)])
    return broadcast(centroids, src=0, group=group)


def update_centroids(
    embeddings: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor, *, group=None
) -> torch.Tensor:
    """M-step: normalised mean of each cluster's members over all ranks; empty clusters keep theirs.

    embeddings: (N_local, D) float32; assignments: (N_local,); centroids: (K, D). Returns (K, D).
    """
    num_clusters = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, assignments, embeddings)  # (K, D)
    # Not torch.bincount: on CUDA it reads the largest index back to the host to size its output.
    counts = torch.zeros(num_clusters, dtype=torch.long, device=assignments.device)
    counts.index_add_(0, assignments, torch.ones_like(assignments))  # (K,)
    all_reduce_sum(sums, group)
    all_reduce_sum(counts, group)
    means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)  # (K, D)
    centroids = torch.where((counts > 0).unsqueeze(1), means, centroids)
    return F.normalize(centroids, dim=1)


@torch.no_grad()
def spherical_kmeans(
    embeddings: torch.Tensor | Sequence[torch.Tensor],
    *,
    num_clusters: Sequence[int],
    num_iters: int,
    generator: torch.Generator | None = None,
    group=None,
    initial_centroids: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Spherical k-means for several heads, sharded over the ranks of ``group``.

    embeddings: (N_local, D) L2-normalised rows, shared by every head; or a sequence with one
        (N_local, D) tensor per head (DeepClusterV2 cycles heads over its memory crops).
    num_clusters: K_h for each head h.
    num_iters: M-steps per head; the assignments come from one more E-step after the last.
    generator: draws rank 0's initial picks; consumed head after head, so heads differ.
    group: process group holding the shards; None is the default group.
    initial_centroids: optional (K_h, D) per head, replacing the random picks (same on all ranks).

    Returns (centroids, assignments): per head, (K_h, D) float32 unit rows and (N_local,) int64.
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = [embeddings] * len(num_clusters)

    all_centroids, all_assignments = [], []
    for head, num_clusters_h in enumerate(num_clusters):
        x = embeddings[head].float()  # (N_local, D); a copy only for half-precision memories
        if initial_centroids is None:
            centroids = sample_initial_centroids(x, num_clusters=num_clusters_h, generator=generator, group=group)
        else:
            centroids = initial_centroids[head].to(device=x.device, dtype=torch.float32)  # (K, D)
        scores = x.new_empty(min(x.shape[0], ASSIGN_CHUNK_ROWS), num_clusters_h)  # (chunk, K) scratch
        assignments = torch.empty(x.shape[0], dtype=torch.long, device=x.device)  # (N_local,)
        for _ in range(num_iters):
            _assign_into(x, centroids, assignments, scores)
            centroids = update_centroids(x, assignments, centroids, group=group)
        _assign_into(x, centroids, assignments, scores)
        all_centroids.append(centroids)
        all_assignments.append(assignments)
    return all_centroids, all_assignments
