import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.methods.swav import SwAV
from fastssl.models.heads import build_heads
from loaders.batch import Batch


def make_swav(**overrides):
    params = dict(temperature=0.1, epsilon=0.05, num_iters=3, crops_for_assign=[0, 1], num_crops=4,
                  num_prototypes=[7], embedding_dim=8, use_double_precision=False, temp_hard_assignment_iters=0,
                  normalize_last_layer=True, queue_start_iter=0, local_queue_length=0)
    params.update(overrides)
    return SwAV(**params)


def batch_of(size):
    return Batch(crops=[], indices=torch.arange(size))


def reference_sinkhorn(scores, epsilon, iters):
    """float64 loop from the paper's formula (Algorithm 1 of SwAV)."""
    Q = torch.exp(scores.double() / epsilon).t()
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def reference_loss(scores, crops_for_assign, num_crops, batch, temperature, epsilon, iters):
    total = 0.0
    for crop_id in crops_for_assign:
        q = reference_sinkhorn(scores[batch * crop_id: batch * (crop_id + 1)], epsilon, iters)
        sub = 0.0
        for v in range(num_crops):
            if v == crop_id:
                continue
            p = F.log_softmax(scores[batch * v: batch * (v + 1)].double() / temperature, dim=1)
            sub -= (q * p).sum(dim=1).mean()
        total += sub / (num_crops - 1)
    return total / len(crops_for_assign)


def test_constant_scores_give_log_k():
    swav = make_swav()
    scores = torch.full((4 * 5, 7), 0.3)
    loss = swav.loss((torch.zeros(20, 8), [scores]), batch_of(5), step=0)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-5)


def test_loss_equals_float64_reference():
    torch.manual_seed(0)
    swav = make_swav()
    scores = torch.randn(4 * 6, 7)
    loss = swav.loss((torch.zeros(24, 8), [scores]), batch_of(6), step=0)
    expected = reference_loss(scores, [0, 1], 4, 6, 0.1, 0.05, 3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_several_prototype_heads_are_averaged():
    torch.manual_seed(1)
    swav = make_swav(num_prototypes=[7, 5])
    a, b = torch.randn(24, 7), torch.randn(24, 5)
    both = swav.loss((torch.zeros(24, 8), [a, b]), batch_of(6), step=0)
    expected = (reference_loss(a, [0, 1], 4, 6, 0.1, 0.05, 3) + reference_loss(b, [0, 1], 4, 6, 0.1, 0.05, 3)) / 2
    assert both.item() == pytest.approx(expected.item(), rel=1e-4)


def test_queue_scores_join_the_sinkhorn_batch_and_queue_shifts():
    torch.manual_seed(2)
    heads = build_heads([["swav_head", {"dims": [4, 8], "use_bn": False, "num_clusters": [7]}]], in_dim=4)
    holder = nn.Module()
    holder.heads = heads
    swav = make_swav(local_queue_length=12, queue_start_iter=1)
    swav.bind(holder)
    embedding = F.normalize(torch.randn(24, 8), dim=1)
    scores = heads[0].prototypes[0](embedding)
    before = swav.queue.clone()
    swav.loss((embedding, [scores]), batch_of(6), step=0)           # before start_iter: queue untouched
    assert torch.equal(swav.queue, before)
    loss = swav.loss((embedding, [scores]), batch_of(6), step=1)
    # The queue now starts with this step's embeddings of the assigned crops, then the old head.
    assert torch.equal(swav.queue[0, :6], embedding[:6]) and torch.equal(swav.queue[1, :6], embedding[6:12])
    assert torch.equal(swav.queue[0, 6:], before[0, :6])
    # And the loss used Sinkhorn over batch + queue: differs from the queue-free loss.
    plain = make_swav().loss((embedding, [scores]), batch_of(6), step=1)
    assert not torch.isclose(loss, plain)
    assert "queue" in swav.state_dict() and not any("prototypes" in k for k in swav.state_dict())


def test_prototypes_are_normalised_after_step():
    heads = build_heads([["swav_head", {"dims": [4, 8], "use_bn": False, "num_clusters": [7]}]], in_dim=4)
    holder = nn.Module()
    holder.heads = heads
    swav = make_swav()
    swav.bind(holder)
    with torch.no_grad():
        heads[0].prototypes[0].weight.mul_(3.0)
    swav.after_step(step=0, model=holder)
    norms = heads[0].prototypes[0].weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_hard_assignment_phase_uses_one_hot_targets():
    torch.manual_seed(3)
    scores = torch.randn(24, 7)
    soft = make_swav(temp_hard_assignment_iters=0).loss((torch.zeros(24, 8), [scores]), batch_of(6), step=0)
    hard = make_swav(temp_hard_assignment_iters=5).loss((torch.zeros(24, 8), [scores]), batch_of(6), step=0)
    assert not torch.isclose(soft, hard)


def test_a_queue_larger_than_a_quarter_of_the_machine_is_refused_before_it_is_allocated(monkeypatch):
    """issue 23: queue_length=1e7 reached 6 GB before anything said no."""
    from fastssl.methods import swav

    monkeypatch.setattr(swav, "_host_memory_bytes", lambda: 64 * 2**20)  # a 64 MiB machine
    make_swav(local_queue_length=100_000, embedding_dim=8)  # 6.1 MiB: fits
    with pytest.raises(ValueError, match=r"swav_loss.queue: 1000000 x 2 crops x 8 dims per rank is 0.1 GiB"):
        make_swav(local_queue_length=1_000_000, embedding_dim=8)
