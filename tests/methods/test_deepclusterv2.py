import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.methods.base import RunInfo
from fastssl.methods.deepclusterv2 import IGNORE, DeepClusterV2
from loaders.batch import Batch

N, D, B = 24, 6, 4
STEPS = N // B


def make_dc2(**overrides):
    params = dict(temperature=0.1, num_clusters=[3, 5], kmeans_iters=4, crops_for_mb=[0, 1], embedding_dim=D,
                  num_crops=3, batch_size=B, local_memory_size=N, num_train_samples=N, iterations_per_epoch=STEPS,
                  total_iterations=2 * STEPS, device="cpu")
    params.update(overrides)
    return DeepClusterV2(**params)


def reference_loss(embedding, centroids, assignments, indices, num_crops, temperature):
    """float64 loop: mean over heads of the mean over (crop, sample) rows with a target of
    -log softmax(<z / |z|, c_k> / T)[target]."""
    per_head = []
    for head, c in enumerate(centroids):
        total, count = 0.0, 0
        for row in range(embedding.shape[0]):
            target = int(assignments[head][int(indices[row % len(indices)])])
            if target == IGNORE:
                continue
            z = embedding[row].double()
            z = z / math.sqrt(sum(float(t) ** 2 for t in z))
            logits = [float(c[k].double() @ z) / temperature for k in range(c.shape[0])]
            total += -logits[target] + math.log(sum(math.exp(v) for v in logits))
            count += 1
        per_head.append(total / count)
    return sum(per_head) / len(per_head)


def test_loss_equals_float64_reference_and_skips_unassigned_samples():
    torch.manual_seed(0)
    dc2 = make_dc2()
    for head, k in enumerate(dc2.num_clusters):
        dc2.centroids[head].copy_(F.normalize(torch.randn(k, D), dim=1))
        dc2.assignments[head].copy_(torch.randint(k, (N,)))
    dc2.assignments[0, 5] = IGNORE  # a sample never in the memory: no target for head 0
    indices = torch.tensor([5, 0, 11, 23])
    embedding = torch.randn(3 * B, D)
    loss = dc2.loss(embedding, Batch(crops=[], indices=indices), step=0)
    expected = reference_loss(embedding, dc2.centroids, dc2.assignments, indices, 3, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_step_writes_memory_crops_at_the_batch_slots():
    torch.manual_seed(1)
    dc2 = make_dc2()
    embedding, indices = torch.randn(3 * B, D), torch.tensor([7, 2, 19, 4])
    dc2.loss(embedding, Batch(crops=[], indices=indices), step=STEPS + 2)  # third batch of epoch 1
    slots = slice(2 * B, 3 * B)
    normalized = F.normalize(embedding, dim=1)
    torch.testing.assert_close(dc2.memory[0, slots], normalized[:B])
    torch.testing.assert_close(dc2.memory[1, slots], normalized[B:2 * B])
    assert torch.equal(dc2.memory_index[slots], indices)
    assert (dc2.memory_index[:2 * B] == -1).all() and (dc2.memory[:, :2 * B] == 0).all()


def blobs(num_blobs, generator):
    """Unit embeddings of N samples around num_blobs well-separated directions; (N, D) and blob ids."""
    centres = F.normalize(torch.randn(num_blobs, D, generator=generator), dim=1) * 10
    blob = torch.arange(N) % num_blobs
    return F.normalize(centres[blob] + torch.randn(N, D, generator=generator) * 0.3, dim=1), blob


def run_epoch(dc2, embeddings, order, epoch):
    """One epoch of steps in ``order`` (dataset indices): writes every sample into the memory."""
    for b in range(STEPS):
        indices = order[b * B:(b + 1) * B]
        crops = torch.cat([embeddings[indices]] * 3)  # (3 * B, D), the same embedding for every crop
        dc2.loss(crops, Batch(crops=[], indices=indices), step=epoch * STEPS + b)
        dc2.after_step(step=epoch * STEPS + b, model=None)


def test_clustering_assigns_every_sample_and_recovers_blobs():
    generator = torch.Generator().manual_seed(2)
    embeddings, blob = blobs(3, generator)
    dc2 = make_dc2(num_clusters=[3, 3])
    torch.manual_seed(2)
    run_epoch(dc2, embeddings, torch.randperm(N, generator=generator), epoch=0)
    assert dc2.clustered_epoch == 1  # clustered after the epoch's last step, for epoch 1
    for head in range(2):
        assignments = dc2.assignments[head]
        assert (assignments >= 0).all() and (assignments < 3).all()  # every sample has a target
        # Same blob <-> same cluster: the clustering is a relabelling of the blobs.
        assert all(len(set(assignments[blob == b].tolist())) == 1 for b in range(3))
        assert len(set(assignments.tolist())) == 3
        torch.testing.assert_close(dc2.centroids[head].norm(dim=1), torch.ones(3))
        # The targets are the nearest centroid of each sample's own memory row.
        nearest = (embeddings @ dc2.centroids[head].t()).argmax(dim=1)
        assert torch.equal(nearest, assignments)


def test_epoch_start_clusters_only_when_not_done_and_state_round_trips():
    generator = torch.Generator().manual_seed(3)
    embeddings, _ = blobs(3, generator)
    dc2 = make_dc2()
    run_epoch(dc2, embeddings, torch.arange(N), epoch=0)
    state = {k: v.clone() for k, v in dc2.state_dict().items() if isinstance(v, torch.Tensor)}
    dc2.on_epoch_start(epoch=1, model=None, loader=None)  # done after the last step: no new draw
    assert all(torch.equal(state[k], v) for k, v in dc2.state_dict().items() if isinstance(v, torch.Tensor))
    restored = make_dc2()
    restored.load_state_dict(dc2.state_dict())
    assert restored.clustered_epoch == 1
    assert torch.equal(restored.assignments, dc2.assignments) and torch.equal(restored.memory, dc2.memory)
    assert all(torch.equal(a, b) for a, b in zip(restored.centroids, dc2.centroids))
    fresh = make_dc2()
    fresh.memory.copy_(dc2.memory)
    fresh.memory_index.copy_(dc2.memory_index)
    fresh.on_epoch_start(epoch=0, model=None, loader=None)
    assert fresh.clustered_epoch == 0 and (fresh.assignments >= 0).all()


class FakeLoader:
    """Two epochs' worth of (crops, indices) batches; set_epoch picks the epoch order."""

    def __init__(self, images):
        self.images, self.epoch = images, None

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(self.epoch))
        for b in range(STEPS):
            indices = order[b * B:(b + 1) * B]
            yield Batch(crops=[self.images[indices] + 0.01 * c for c in range(3)], indices=indices)


def test_fill_memory_covers_the_dataset_and_restores_the_mode():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, D))
    forward = model.forward
    model.forward = lambda crops: forward(torch.cat(crops))
    model.eval()
    loader = FakeLoader(torch.randn(N, 5))
    dc2 = make_dc2()
    dc2.on_train_start(model=model, loader=loader, fresh_start=True)
    assert loader.epoch == 0 and not model.training
    assert sorted(dc2.memory_index.tolist()) == list(range(N))
    torch.testing.assert_close(dc2.memory.norm(dim=2), torch.ones(2, N))
    resumed = make_dc2()
    resumed.on_train_start(model=model, loader=loader, fresh_start=False)
    assert (resumed.memory_index == -1).all()  # a resumed run keeps its checkpointed memory


def test_fill_memory_runs_one_forward_per_crop():
    """VISSL's deepclusterv2_loss.py init_memory: model(crop) for each crop of crops_for_mb, so BatchNorm
    (training mode) normalises each crop over its own B rows, not over the M * B rows of all memory crops."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, D))
    forward = model.forward
    model.forward = lambda crops: forward(torch.cat(crops))
    loader = FakeLoader(torch.randn(N, 5))
    dc2 = make_dc2()
    dc2.fill_memory(model=model, loader=loader)
    joint_differs = False
    with torch.no_grad():
        for batch_number, batch in enumerate(loader):
            slots = slice(batch_number * B, (batch_number + 1) * B)
            for m in range(2):
                torch.testing.assert_close(dc2.memory[m, slots], F.normalize(forward(batch.crops[m]), dim=1))
            joint = F.normalize(forward(torch.cat(batch.crops[:2])), dim=1)[:B]
            joint_differs |= not torch.allclose(joint, dc2.memory[0, slots], atol=1e-4)
    assert joint_differs  # the test tells the two apart


def test_from_config_sizes_the_memory_per_rank():
    params = {"temperature": 0.1, "num_clusters": [4], "kmeans_iters": 3, "DROP_LAST": True,
              "BATCHSIZE_PER_REPLICA": 999, "num_crops": 7, "num_train_samples": -1,
              "memory_params": {"crops_for_mb": [0], "embedding_dim": D}}
    info = dict(rank=1, world_size=4, batch_size_per_replica=8, global_batch_size=32, num_crops=2,
                num_train_samples=1000, iterations_per_epoch=31, total_iterations=62,
                device=torch.device("cpu"), head_params=[["mlp", {"dims": [16, D]}]])
    dc2 = DeepClusterV2.from_config(params, RunInfo(**info, drop_last=True))
    assert dc2.memory.shape == (1, 31 * 8, D) and dc2.assignments.shape == (1, 1000) and dc2.num_crops == 2
    assert DeepClusterV2.from_config(params, RunInfo(**info, drop_last=False)).memory.shape == (1, 250, D)
    with pytest.raises(ValueError, match="embedding_dim"):
        DeepClusterV2.from_config({**params, "memory_params": {"crops_for_mb": [0], "embedding_dim": 3}},
                                  RunInfo(**info, drop_last=True))
    with pytest.raises(ValueError, match="num_clusters"):
        DeepClusterV2.from_config({**params, "num_clusters": [300]}, RunInfo(**info, drop_last=True))
    with pytest.raises(ValueError, match="crops_for_mb"):
        DeepClusterV2.from_config({**params, "memory_params": {"crops_for_mb": [2], "embedding_dim": D}},
                                  RunInfo(**info, drop_last=True))
