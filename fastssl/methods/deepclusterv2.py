"""DeepClusterV2: k-means pseudo-labels on an embedding memory (Caron et al. 2020, the DeepCluster-v2
variant of the SwAV paper; seed deepclusterv2.rst). Semantics are VISSL's ``deepclusterv2_loss``.

Each rank keeps the L2-normalised embeddings of the crops in ``crops_for_mb`` for every sample it
saw in the last epoch (the memory). Before each epoch, spherical k-means over the memories of all
ranks (one clustering per head, heads cycling over the memory crops) gives K_h centroids and one
cluster per sample; during the epoch every crop of a sample is trained to predict its sample's
cluster: cross-entropy of <z, c_k> / temperature against the assignment, averaged over heads.

Memory layout (VISSL's): slot j of a rank's memory holds the sample at position j of this rank's
epoch order, i.e. batch ``step % iterations_per_epoch`` writes slots [b * B, b * B + B), and
``memory_index`` records the dataset index in each slot, so any sharding of the data works.
Cost per rank: len(crops_for_mb) * L * embedding_dim * 4 bytes with L ~ N / world_size
(ImageNet on 64 GPUs, 2 memory crops, D=128: 20 MB), plus the (heads, N) int64 assignments.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from kernels.collectives import all_gather_cat
from kernels.kmeans import spherical_kmeans
from kernels.memory_bank import write_embedding_memory
from loaders.batch import Batch

from .base import Method, RunInfo

IGNORE = -100  # target of a sample with no assignment yet (never in the memory): left out of the loss


def embedding_of(outputs) -> torch.Tensor:
    """The embedding rows of the model output: an mlp head's tensor, or a swav_head's (embedding, scores)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


class DeepClusterV2(Method):
    monitors_embedding = True  # its first head's output is the embedding (fastssl/monitor.py)
    rank_local_state = ("memory", "memory_index")  # each rank remembers the samples it saw; the rest is shared

    def __init__(self, *, temperature: float, num_clusters: list[int], kmeans_iters: int, crops_for_mb: list[int],
                 embedding_dim: int, num_crops: int, batch_size: int, local_memory_size: int,
                 num_train_samples: int, iterations_per_epoch: int, total_iterations: int,
                 device: torch.device | str, process_group=None, autocast=contextlib.nullcontext):
        super().__init__()
        if not crops_for_mb or max(crops_for_mb) >= num_crops:
            raise ValueError(f"deepclusterv2_loss.memory_params.crops_for_mb {crops_for_mb} must name crops "
                             f"below num_crops={num_crops}")
        if not num_clusters:
            raise ValueError("deepclusterv2_loss.num_clusters needs at least one entry (one per head)")
        if max(num_clusters) > local_memory_size:
            raise ValueError(f"deepclusterv2_loss.num_clusters {num_clusters}: k-means draws its initial centroids "
                             f"from one rank's memory of {local_memory_size} samples; reduce num_clusters")
        self.temperature = temperature
        self.num_clusters = list(num_clusters)
        self.kmeans_iters = kmeans_iters
        self.crops_for_mb = list(crops_for_mb)
        self.num_crops = num_crops
        self.batch_size = batch_size
        self.iterations_per_epoch = iterations_per_epoch
        self.total_iterations = total_iterations
        self.process_group = process_group
        self._autocast = autocast  # the loop's autocast, for the memory fill that runs outside the step
        self.clustered_epoch = -1  # the epoch whose targets the centroids/assignments hold (extra state)
        self._debug: dict = {}
        memory_crops = len(crops_for_mb)
        self.register_buffer("memory", torch.zeros(memory_crops, local_memory_size, embedding_dim, device=device))
        self.register_buffer("memory_index", torch.full((local_memory_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("assignments", torch.full((len(num_clusters), num_train_samples), IGNORE,
                                                       dtype=torch.long, device=device))  # (H, N)
        for head, k in enumerate(num_clusters):
            self.register_buffer(f"centroids{head}", torch.zeros(k, embedding_dim, device=device))  # (K_h, D)

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "DeepClusterV2":
        """LOSS.deepclusterv2_loss plus the values VISSL infers (num_crops, BATCHSIZE_PER_REPLICA, DROP_LAST,
        num_train_samples: taken from the run, whatever the config says) and the memory size per rank."""
        embedding_dim = params["memory_params"]["embedding_dim"]
        head_name, head = run.head_params[-1]
        if head["dims"][-1] != embedding_dim:
            raise ValueError(f"deepclusterv2_loss.memory_params.embedding_dim={embedding_dim} but the last head "
                             f"({head_name}) outputs {head['dims'][-1]}")
        if run.drop_last:  # every rank runs iterations_per_epoch full batches
            local_memory_size = run.iterations_per_epoch * run.batch_size_per_replica
        else:  # round-robin shards: rank 0's is the largest
            local_memory_size = math.ceil(run.num_train_samples / run.world_size)
        return cls(temperature=params["temperature"], num_clusters=list(params["num_clusters"]),
                   kmeans_iters=params["kmeans_iters"], crops_for_mb=list(params["memory_params"]["crops_for_mb"]),
                   embedding_dim=embedding_dim, num_crops=run.num_crops,
                   batch_size=run.batch_size_per_replica, local_memory_size=local_memory_size,
                   num_train_samples=run.num_train_samples, iterations_per_epoch=run.iterations_per_epoch,
                   total_iterations=run.total_iterations, device=run.device, process_group=run.process_group,
                   autocast=run.autocast)

    @property
    def centroids(self) -> list[torch.Tensor]:
        return [getattr(self, f"centroids{head}") for head in range(len(self.num_clusters))]

    def get_extra_state(self) -> dict:
        return {"clustered_epoch": self.clustered_epoch}

    def set_extra_state(self, state: dict) -> None:
        self.clustered_epoch = state["clustered_epoch"]

    # ---------------- hooks ------------------------------------------------------------------
    def on_train_start(self, *, model, loader, fresh_start: bool) -> None:
        if fresh_start:
            self.fill_memory(model=model, loader=loader)

    def on_epoch_start(self, *, epoch: int, model, loader) -> None:
        # Normally done already after the previous epoch's last step (see after_step); here for epoch 0
        # and for a run stopped between that step and its checkpoint.
        if self.clustered_epoch != epoch:
            self.cluster(epoch=epoch)

    def after_step(self, *, step: int, model) -> None:
        # Cluster at the end of the epoch rather than at the start of the next one: the memory then holds
        # every rank's last epoch, and the checkpoint written next holds the finished clustering, so a
        # resume at the epoch boundary continues identically on any number of ranks.
        if (step + 1) % self.iterations_per_epoch == 0 and step + 1 < self.total_iterations:
            self.cluster(epoch=(step + 1) // self.iterations_per_epoch)

    # ---------------- memory and clustering ----------------------------------------------------
    @torch.no_grad()
    def fill_memory(self, *, model, loader) -> None:
        """One pass over epoch 0's batches with the current model, so the first clustering has targets
        for every sample (VISSL's init_memory). BatchNorm runs in training mode, as during training."""
        was_training = model.training
        model.train()
        loader.set_epoch(0)
        for batch_number, batch in enumerate(loader):
            crops = [batch.crops[crop] for crop in self.crops_for_mb]
            with self._autocast():  # one forward per crop (BatchNorm over B rows), as VISSL's init_memory
                embedding = torch.cat([embedding_of(model([crop])) for crop in crops])  # (M * B, D)
            self._write(F.normalize(embedding.float(), dim=1), batch.indices, batch_number, list(range(len(crops))))
        model.train(was_training)

    def _write(self, embedding: torch.Tensor, indices: torch.Tensor, batch_number: int, crops: list[int]) -> None:
        """Store rows of crops ``crops`` of ``embedding`` (C * b, D) at this batch's slots."""
        batch_size = indices.shape[0]
        start = batch_number * self.batch_size
        if start + batch_size > self.memory_index.shape[0]:
            raise RuntimeError(f"deepclusterv2: batch {batch_number} of the epoch does not fit the memory of "
                               f"{self.memory_index.shape[0]} samples per rank")
        per_crop = embedding.view(-1, batch_size, embedding.shape[1])[crops]  # (M, b, D)
        positions = torch.arange(start, start + batch_size, device=indices.device)
        write_embedding_memory(self.memory, positions, per_crop)
        self.memory_index[start:start + batch_size] = indices

    @torch.no_grad()
    def cluster(self, *, epoch: int) -> None:
        """Spherical k-means over all ranks' memories; heads cycle over the memory crops (VISSL)."""
        memory_crops = len(self.crops_for_mb)
        embeddings = [self.memory[head % memory_crops] for head in range(len(self.num_clusters))]
        centroids, local_assignments = spherical_kmeans(embeddings, num_clusters=self.num_clusters,
                                                        num_iters=self.kmeans_iters, group=self.process_group)
        indices = all_gather_cat(self.memory_index, self.process_group)  # (W * L,)
        num_samples = self.assignments.shape[1]
        # Slots never written (index -1, a short last shard) go to a scratch column N, dropped below.
        destination = torch.where(indices >= 0, indices, torch.full_like(indices, num_samples))
        for head, head_centroids in enumerate(centroids):
            self.centroids[head].copy_(head_centroids)
            gathered = all_gather_cat(local_assignments[head], self.process_group)  # (W * L,)
            targets = torch.full((num_samples + 1,), IGNORE, dtype=torch.long, device=gathered.device)
            targets.index_copy_(0, destination, gathered)
            self.assignments[head].copy_(targets[:num_samples])
        self.clustered_epoch = epoch

    # ---------------- loss -------------------------------------------------------------------
    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        embedding = F.normalize(embedding_of(outputs).float(), dim=1)  # (C * B, D)
        targets = self.assignments.index_select(1, batch.indices).repeat(1, self.num_crops)  # (H, C * B)
        total = 0.0
        for head, centroids in enumerate(self.centroids):
            scores = embedding @ centroids.t() / self.temperature  # (C * B, K_h)
            total = total + F.cross_entropy(scores, targets[head], ignore_index=IGNORE)
            self._debug[f"scores{head}"] = scores.detach()
        self._debug["targets"] = targets
        with torch.no_grad():
            self._write(embedding.detach(), batch.indices, step % self.iterations_per_epoch, self.crops_for_mb)
        return total / len(self.num_clusters)

    def last_prototype_scores(self) -> torch.Tensor | None:
        return self._debug.get("scores0")

    def debug_tensors(self) -> dict:
        return {**super().debug_tensors(), **self._debug}
