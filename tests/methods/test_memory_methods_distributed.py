"""NPID and DeepClusterV2 on 2 gloo ranks: the 2-rank results equal one process on the global batch."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl.methods.npid as npid_module
from fastssl.methods.deepclusterv2 import DeepClusterV2
from fastssl.methods.npid import NPID
from loaders.batch import Batch
from rank_harness import run_ranks


WORLD_SIZE, N, D, K, B = 2, 30, 8, 6, 5


def global_data():
    """Each rank takes rows [rank * B, (rank + 1) * B) of the batch and half of the memory samples."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, D, generator=generator), dim=1) * 10
    blob = torch.arange(N) % 3
    return {
        "embedding": torch.randn(WORLD_SIZE * B, D, generator=generator),
        "indices": torch.randperm(N, generator=generator)[:WORLD_SIZE * B],
        "negatives": torch.randint(N, (WORLD_SIZE * B, K), generator=generator),
        "memory": F.normalize(centres[blob] + 0.3 * torch.randn(N, D, generator=generator), dim=1),
        "memory_order": torch.randperm(N, generator=generator),
        "blob": blob,
    }


def make_npid():
    return NPID(loss_type="nce", norm_embedding=True, temperature=0.1, loss_weights=[1.0], norm_constant=-1.0,
                update_mem_with_emb_index=-100, num_negatives=K, memory_size=-1, embedding_dim=D, momentum=0.5,
                norm_init=True, update_mem_on_forward=True, num_train_samples=N, num_crops=1, device="cpu")


def use_negatives(negatives):
    npid_module.sample_negatives = lambda *args, **kwargs: negatives


def on_each_rank(rank, world_size):
    data = global_data()
    rows = slice(rank * B, (rank + 1) * B)
    torch.manual_seed(100 + rank)  # each rank draws its own initial bank, as the trainer seeds them
    npid = make_npid()
    npid.on_train_start(model=None, loader=None, fresh_start=True)
    start_bank = npid.bank.clone()
    use_negatives(data["negatives"][rows])
    loss = npid.loss(data["embedding"][rows], Batch(crops=[], indices=data["indices"][rows]), step=0)

    half = N // world_size
    local = data["memory_order"][rank * half:(rank + 1) * half]
    dc2 = DeepClusterV2(temperature=0.1, num_clusters=[3, 4], kmeans_iters=5, crops_for_mb=[0], embedding_dim=D,
                        num_crops=2, batch_size=half, local_memory_size=half, num_train_samples=N,
                        iterations_per_epoch=1, total_iterations=2, device="cpu")
    dc2.memory[0].copy_(data["memory"][local])
    dc2.memory_index.copy_(local)
    dc2.on_epoch_start(epoch=0, model=None, loader=None)
    return {"start_bank": start_bank, "loss": loss.detach(), "bank": npid.bank, "z": npid.norm_constant,
            "assignments": dc2.assignments, "centroids": dc2.centroids}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(on_each_rank, world_size=WORLD_SIZE)


def vissl_start_bank_and_z():
    """float64 reference of VISSL's nce_loss.py on 2 ranks: each rank draws uniform rows in [-stdv, stdv],
    stdv = 1 / sqrt(D / 3), and L2-normalises them (init_memory, norm_init); sync_memory averages the
    ranks' banks (all_reduce_mean) and does not normalise again; compute_partition_function sets
    Z = N * mean(exp(<bank row, f> / T)) over the positive and negative columns of the global batch."""
    stdv = 1.0 / math.sqrt(D / 3)
    banks = []
    for rank in range(WORLD_SIZE):
        torch.manual_seed(100 + rank)
        rows = torch.rand(N, D).double() * 2 * stdv - stdv
        banks.append(rows / rows.norm(dim=1, keepdim=True))
    bank = sum(banks) / WORLD_SIZE
    data = global_data()
    embedding = F.normalize(data["embedding"].double(), dim=1)
    columns = torch.cat((data["indices"].unsqueeze(1), data["negatives"]), dim=1)  # (W * B, 1 + K)
    scores = torch.einsum("bkd,bd->bk", bank[columns], embedding) / 0.1
    return bank, N * torch.exp(scores).mean()


def test_npid_start_bank_and_z_are_vissls(ranks):
    bank, z = vissl_start_bank_and_z()
    for rank in ranks:
        torch.testing.assert_close(rank["start_bank"].double(), bank)
        torch.testing.assert_close(rank["z"].double(), z)
    assert (bank.norm(dim=1) < 1 - 1e-3).all()  # rows of the mean are shorter than 1: not re-normalised


def test_npid_bank_starts_and_stays_equal_and_matches_one_process(ranks, monkeypatch):
    first, second = ranks
    assert torch.equal(first["start_bank"], second["start_bank"])
    assert torch.equal(first["bank"], second["bank"]) and torch.equal(first["z"], second["z"])
    data = global_data()
    single = make_npid()
    single.bank.copy_(first["start_bank"])
    monkeypatch.setattr(npid_module, "sample_negatives", lambda *args, **kwargs: data["negatives"])
    loss = single.loss(data["embedding"], Batch(crops=[], indices=data["indices"]), step=0)
    torch.testing.assert_close(single.norm_constant, first["z"])  # Z from the whole global batch
    torch.testing.assert_close((first["loss"] + second["loss"]) / 2, loss.detach())
    torch.testing.assert_close(single.bank, first["bank"])


def test_deepclusterv2_clusters_the_memories_of_all_ranks(ranks):
    first, second = ranks
    blob = global_data()["blob"]
    assert torch.equal(first["assignments"], second["assignments"])
    assert all(torch.equal(a, b) for a, b in zip(first["centroids"], second["centroids"]))
    assert (first["assignments"] >= 0).all()  # every sample of both ranks' memories has a target
    # Three separated blobs, whichever rank held their samples: no cluster mixes two blobs, and the
    # 3-cluster head puts each blob in one cluster (the 4-cluster head splits one).
    for assignments in first["assignments"]:
        assert all(len(set(blob[assignments == k].tolist())) <= 1 for k in range(4))
    assert all(len(set(first["assignments"][0, blob == b].tolist())) == 1 for b in range(3))
