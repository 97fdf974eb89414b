"""2-rank gloo runs of every kernel equal 1-process runs on the concatenated global batch.

One spawn serves all the checks (starting two processes that import torch is most of the cost):
``_on_each_rank`` runs every kernel on its shard and returns the results; each test compares one
of them with the single-process computation on the whole batch.
"""
import pytest
import torch
import torch.nn.functional as F
from rank_harness import run_ranks

from kernels import collectives
from kernels.kmeans import sample_initial_centroids, spherical_kmeans
from kernels.memory_bank import average_across_ranks, init_memory_bank, update_memory_bank
from kernels.sinkhorn import sinkhorn

WORLD_SIZE = 2
NUM_CLUSTERS = [5, 7]


def global_data():
    """The global batch of every check; each rank takes rows [rank * B, (rank + 1) * B)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "scores": torch.randn(2 * 6, 9, generator=generator, dtype=torch.float64),
        "features": torch.randn(2 * 3, 4, generator=generator, dtype=torch.float64),
        "weights": torch.randn(WORLD_SIZE, 2 * 3, 4, generator=generator, dtype=torch.float64),
        "embeddings": F.normalize(torch.randn(2 * 40, 8, generator=generator), dim=1),
        "indices": torch.randperm(30, generator=generator)[: 2 * 5],
        "batch_embeddings": torch.randn(2 * 5, 8, generator=generator, dtype=torch.float64),
    }


def shard(tensor, rank):
    rows = tensor.shape[0] // WORLD_SIZE
    return tensor[rank * rows : (rank + 1) * rows]


def per_rank_loss(gathered, weights, rank):
    """A different nonlinear loss on each rank, all reading the whole gathered batch."""
    return ((weights[rank] * gathered) ** 2).sum() + gathered.sin().sum() * rank


def _on_each_rank(rank, world_size):
    data = global_data()
    out = {
        "world_size": collectives.world_size(),
        "rank": collectives.rank(),
        "is_distributed": collectives.is_distributed(),
        "sum": collectives.all_reduce_sum(torch.tensor([1.0, rank])),
        "max": collectives.all_reduce_max(torch.tensor([rank, -rank])),
        "broadcast": collectives.broadcast(torch.tensor([rank + 10]), src=1),
        "gather": collectives.all_gather_cat(shard(data["features"], rank)),
    }

    scores = shard(data["scores"], rank)
    out["sinkhorn64"] = sinkhorn(scores, epsilon=0.05, num_iters=3, use_double_precision=True)
    out["sinkhorn32_half_input"] = sinkhorn(scores.half(), epsilon=0.05, num_iters=3)
    out["sinkhorn_hard"] = sinkhorn(scores, epsilon=0.05, num_iters=3, hard_assignment=True)

    features = shard(data["features"], rank).clone().requires_grad_()
    gathered = collectives.all_gather_cat_with_grad(features)
    per_rank_loss(gathered, data["weights"], rank).backward()
    out["gathered_with_grad"] = gathered.detach()
    out["features_grad"] = features.grad

    # Each rank seeds its own generator: only rank 0's picks may matter.
    generator = torch.Generator().manual_seed(100 + rank)
    out["kmeans"] = spherical_kmeans(
        shard(data["embeddings"], rank), num_clusters=NUM_CLUSTERS, num_iters=4, generator=generator
    )

    # Each rank starts from its own draw; averaging makes the banks equal.
    generator = torch.Generator().manual_seed(rank)
    bank = init_memory_bank(30, 8, generator=generator, device="cpu", dtype=torch.float64)
    average_across_ranks(bank)
    out["averaged_bank"] = bank.clone()
    update_memory_bank(bank, shard(data["indices"], rank), shard(data["batch_embeddings"], rank), momentum=0.5)
    out["updated_bank"] = bank
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_on_each_rank, world_size=WORLD_SIZE, timeout_s=60)


def cat(ranks, key):
    return torch.cat([r[key] for r in ranks])


def test_collectives(ranks):
    data = global_data()
    for rank, out in enumerate(ranks):
        assert (out["world_size"], out["rank"], out["is_distributed"]) == (2, rank, True)
        assert torch.equal(out["sum"], torch.tensor([2.0, 1.0]))
        assert torch.equal(out["max"], torch.tensor([1, 0]))
        assert torch.equal(out["broadcast"], torch.tensor([11]))
        assert torch.equal(out["gather"], data["features"])


def test_sinkhorn_two_ranks_equals_one_process_on_the_global_batch(ranks):
    scores = global_data()["scores"]
    expected = sinkhorn(scores, epsilon=0.05, num_iters=3, use_double_precision=True)
    torch.testing.assert_close(cat(ranks, "sinkhorn64"), expected, atol=1e-12, rtol=1e-10)
    expected_half = sinkhorn(scores.half(), epsilon=0.05, num_iters=3)
    torch.testing.assert_close(cat(ranks, "sinkhorn32_half_input"), expected_half)
    expected_hard = sinkhorn(scores, epsilon=0.05, num_iters=3, hard_assignment=True)
    assert torch.equal(cat(ranks, "sinkhorn_hard"), expected_hard)
    # The equipartition really spans both ranks: each half on its own gives other codes.
    separately = torch.cat(
        [sinkhorn(shard(scores, r), epsilon=0.05, num_iters=3, use_double_precision=True) for r in range(2)]
    )
    assert (cat(ranks, "sinkhorn64") - separately).abs().max() > 1e-3


def test_all_gather_cat_with_grad_values_and_gradients(ranks):
    data = global_data()
    features = data["features"].clone().requires_grad_()
    total = sum(per_rank_loss(features, data["weights"], rank) for rank in range(WORLD_SIZE))
    total.backward()
    for out in ranks:
        assert torch.equal(out["gathered_with_grad"], data["features"])
    torch.testing.assert_close(cat(ranks, "features_grad"), features.grad, atol=1e-12, rtol=1e-12)


def test_kmeans_two_ranks_equals_one_process_with_rank0_initialisation(ranks):
    embeddings = global_data()["embeddings"]
    generator = torch.Generator().manual_seed(100)  # rank 0's generator, drawn from rank 0's shard
    initial = [
        sample_initial_centroids(shard(embeddings, 0), num_clusters=k, generator=generator) for k in NUM_CLUSTERS
    ]
    expected_centroids, expected_assignments = spherical_kmeans(
        embeddings, num_clusters=NUM_CLUSTERS, num_iters=4, initial_centroids=initial
    )
    for head in range(len(NUM_CLUSTERS)):
        for out in ranks:
            torch.testing.assert_close(out["kmeans"][0][head], expected_centroids[head])
        assignments = torch.cat([out["kmeans"][1][head] for out in ranks])
        assert torch.equal(assignments, expected_assignments[head])


def test_memory_bank_two_ranks_equals_one_process_on_the_global_batch(ranks):
    data = global_data()
    banks = [
        init_memory_bank(30, 8, generator=torch.Generator().manual_seed(r), device="cpu", dtype=torch.float64)
        for r in range(WORLD_SIZE)
    ]
    averaged = (banks[0] + banks[1]) / 2
    for out in ranks:
        torch.testing.assert_close(out["averaged_bank"], averaged, atol=1e-15, rtol=0)
    expected = update_memory_bank(averaged.clone(), data["indices"], data["batch_embeddings"], momentum=0.5)
    for out in ranks:
        torch.testing.assert_close(out["updated_bank"], expected, atol=1e-15, rtol=0)
