"""Without an initialised process group every collective is a no-op (the 2-rank behaviour is
checked in test_kernels_distributed.py)."""
import torch

from kernels import collectives


def test_single_process_sizes():
    assert collectives.world_size() == 1
    assert collectives.rank() == 0
    assert not collectives.is_distributed()


def test_reductions_and_broadcast_return_their_input_unchanged():
    t = torch.tensor([1.0, -2.0])
    for op in (collectives.all_reduce_sum, collectives.all_reduce_max):
        out = op(t)
        assert out is t and torch.equal(out, torch.tensor([1.0, -2.0]))
    assert collectives.broadcast(t, src=0) is t


def test_gathers_are_the_identity_with_and_without_grad():
    x = torch.randn(3, 2, requires_grad=True)
    gathered = collectives.all_gather_cat(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    gathered = collectives.all_gather_cat_with_grad(x)
    (gathered * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3, 2), 3.0))
