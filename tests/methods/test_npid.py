import math

import pytest
import torch
import torch.nn.functional as F

import fastssl.methods.npid as npid_module
from fastssl.methods.base import RunInfo
from fastssl.methods.npid import NPID
from loaders.batch import Batch

N, D, K, B = 40, 8, 5, 6


def make_npid(**overrides):
    params = dict(loss_type="nce", norm_embedding=True, temperature=0.1, loss_weights=[1.0], norm_constant=-1.0,
                  update_mem_with_emb_index=-100, num_negatives=K, memory_size=-1, embedding_dim=D, momentum=0.5,
                  norm_init=True, update_mem_on_forward=True, num_train_samples=N, num_crops=1, device="cpu")
    params.update(overrides)
    return NPID(**params)


@pytest.fixture
def fixed_negatives(monkeypatch):
    """Replace the uniform draw by known negatives, so the reference can score the same rows."""
    drawn = []

    def sample(num_samples, batch_size, num_negatives, *, generator, device):
        negatives = torch.randint(num_samples, (batch_size, num_negatives), generator=torch.Generator().manual_seed(
            len(drawn)))
        drawn.append(negatives)
        return negatives

    monkeypatch.setattr(npid_module, "sample_negatives", sample)
    return drawn


def reference_scores(bank, embedding, indices, negatives, temperature):
    """float64 loop: s_ij = <v_j, f_i / |f_i|> / T with j = the sample itself, then its negatives."""
    rows = []
    for i in range(embedding.shape[0]):
        f = embedding[i].double()
        f = f / math.sqrt(sum(float(t) ** 2 for t in f))
        ids = [int(indices[i])] + [int(j) for j in negatives[i]]
        rows.append([float(bank[j].double() @ f) / temperature for j in ids])
    return rows


def reference_nce(rows, norm_constant, num_samples):
    """NPID Eq. 6 in float64: noise probability 1/N, P = exp(s) / Z."""
    total = 0.0
    for row in rows:
        k = len(row) - 1
        noise = k / num_samples
        p = [math.exp(s) / norm_constant for s in row]
        total += -math.log(p[0] / (p[0] + noise)) - sum(math.log(noise / (q + noise)) for q in p[1:])
    return total / len(rows)


def test_nce_with_estimated_z_equals_float64_reference(fixed_negatives):
    torch.manual_seed(0)
    npid = make_npid()
    bank = npid.bank.clone()
    embedding, indices = torch.randn(B, D), torch.randperm(N)[:B]
    loss = npid.loss(embedding, Batch(crops=[], indices=indices), step=0)
    rows = reference_scores(bank, embedding, indices, fixed_negatives[0], 0.1)
    z = N * sum(math.exp(s) for row in rows for s in row) / (B * (K + 1))
    assert npid.norm_constant.item() == pytest.approx(z, rel=1e-5)
    assert loss.item() == pytest.approx(reference_nce(rows, z, N), rel=1e-5)


def test_infonce_equals_float64_reference(fixed_negatives):
    torch.manual_seed(1)
    npid = make_npid(loss_type="cross_entropy")
    bank = npid.bank.clone()
    embedding, indices = torch.randn(B, D), torch.randperm(N)[:B]
    loss = npid.loss(embedding, Batch(crops=[], indices=indices), step=0)
    rows = reference_scores(bank, embedding, indices, fixed_negatives[0], 0.1)
    expected = sum(-row[0] + math.log(sum(math.exp(s) for s in row)) for row in rows) / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_given_norm_constant_and_crop_weights(fixed_negatives):
    torch.manual_seed(2)
    npid = make_npid(norm_constant=7.5, num_crops=2, loss_weights=[0.25, 2.0], update_mem_on_forward=False,
                     update_mem_with_emb_index=0)
    bank = npid.bank.clone()
    embedding, indices = torch.randn(2 * B, D), torch.randperm(N)[:B]
    loss = npid.loss(embedding, Batch(crops=[], indices=indices), step=0)
    # Crop 1 is scored against the bank after crop 0's update (VISSL's order).
    first = reference_scores(bank, embedding[:B], indices, fixed_negatives[0], 0.1)
    updated = bank.clone()
    updated[indices] = F.normalize(0.5 * bank[indices] + 0.5 * F.normalize(embedding[:B], dim=1), dim=1)
    second = reference_scores(updated, embedding[B:], indices, fixed_negatives[1], 0.1)
    expected = 0.25 * reference_nce(first, 7.5, N) + 2.0 * reference_nce(second, 7.5, N)
    assert npid.norm_constant.item() == 7.5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(npid.bank, updated)  # crop 1 did not update the bank


def test_norm_constant_is_estimated_once_and_survives_a_state_round_trip():
    torch.manual_seed(3)
    npid = make_npid()
    indices = torch.arange(B)
    npid.loss(torch.randn(B, D), Batch(crops=[], indices=indices), step=0)
    z = npid.norm_constant.clone()
    assert z > 0 and npid.norm_constant_known
    npid.loss(10 * torch.randn(B, D), Batch(crops=[], indices=indices + B), step=1)
    assert torch.equal(npid.norm_constant, z)
    restored = make_npid()
    restored.load_state_dict(npid.state_dict())
    assert restored.norm_constant_known and torch.equal(restored.norm_constant, z)
    assert torch.equal(restored.bank, npid.bank)
    restored.loss(torch.randn(B, D), Batch(crops=[], indices=indices), step=2)
    assert torch.equal(restored.norm_constant, z)


def test_bank_update_keeps_unit_rows_and_touches_only_the_batch():
    torch.manual_seed(4)
    npid = make_npid(momentum=0.3)
    before = npid.bank.clone()
    torch.testing.assert_close(before.norm(dim=1), torch.ones(N))
    embedding, indices = torch.randn(B, D), torch.tensor([3, 17, 0, 39, 8, 21])
    npid.loss(embedding, Batch(crops=[], indices=indices), step=0)
    others = torch.ones(N, dtype=torch.bool)
    others[indices] = False
    assert torch.equal(npid.bank[others], before[others])
    torch.testing.assert_close(npid.bank.norm(dim=1), torch.ones(N))
    expected = F.normalize(0.3 * before[indices] + 0.7 * F.normalize(embedding, dim=1), dim=1)
    torch.testing.assert_close(npid.bank[indices], expected)


def test_gradient_reaches_the_embedding_and_not_the_bank():
    torch.manual_seed(5)
    npid = make_npid()
    embedding = torch.randn(B, D, requires_grad=True)
    npid.loss(embedding, Batch(crops=[], indices=torch.arange(B)), step=0).backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    assert not npid.bank.requires_grad


def run_info(**overrides):
    values = dict(rank=0, world_size=1, batch_size_per_replica=B, global_batch_size=B, num_crops=1,
                  num_train_samples=N, iterations_per_epoch=N // B, total_iterations=N // B, drop_last=True,
                  device=torch.device("cpu"), head_params=[["mlp", {"dims": [16, D]}]])
    values.update(overrides)
    return RunInfo(**values)


PARAMS = {"loss_type": "nce", "norm_embedding": True, "temperature": 0.07, "loss_weights": [1.0],
          "norm_constant": -1, "update_mem_with_emb_index": -100, "num_train_samples": -1,
          "negative_sampling_params": {"num_negatives": K, "type": "random"},
          "memory_params": {"memory_size": -1, "embedding_dim": D, "momentum": 0.5, "norm_init": True,
                            "update_mem_on_forward": True}}


def test_from_config_fills_the_dataset_size_and_checks_the_keys():
    npid = NPID.from_config(PARAMS, run_info())
    assert npid.bank.shape == (N, D) and npid.num_train_samples == N and not npid.norm_constant_known
    bad_dim = {**PARAMS, "memory_params": {**PARAMS["memory_params"], "embedding_dim": 2 * D}}
    with pytest.raises(ValueError, match="embedding_dim"):
        NPID.from_config(bad_dim, run_info())
    with pytest.raises(ValueError, match="loss_weights"):
        NPID.from_config(PARAMS, run_info(num_crops=2))
    with pytest.raises(ValueError, match="loss_type"):
        NPID.from_config({**PARAMS, "loss_type": "hinge"}, run_info())
    unnormalised = {**PARAMS, "memory_params": {**PARAMS["memory_params"], "norm_init": False}}
    assert not torch.allclose(NPID.from_config(unnormalised, run_info()).bank.norm(dim=1), torch.ones(N))
