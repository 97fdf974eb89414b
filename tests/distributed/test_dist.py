"""fastssl.dist on 2 (and 4) gloo CPU ranks: SyncBN == BatchNorm on the global batch (values and
gradients), GROUP_SIZE groups, the agreed stop vote, and the collective timeout."""
import os
import signal
import time

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from fastssl import dist
from rank_harness import run_ranks


def _global_batch(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64) * 3 + 1  # (2B, C, ...)
    upstream = torch.randn(*shape, generator=generator, dtype=torch.float64)  # dLoss/dy
    return x, upstream


def _bn(kind, channels):
    bn = (nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d)(channels, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    return bn


SHAPES = {"2d": (8, 3, 5, 4), "1d": (8, 6)}


def _sync_bn_rank(kind):
    def check(rank, world_size):
        x, upstream = _global_batch(SHAPES[kind])
        rows = x.shape[0] // world_size
        local = x[rank * rows:(rank + 1) * rows].clone().requires_grad_()
        if kind == "2d":
            local = local.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        model = dist.convert_sync_batchnorm(nn.Sequential(_bn(kind, x.shape[1])), process_group=None,
                                           device=torch.device("cpu"))
        y = model(local)
        (y * upstream[rank * rows:(rank + 1) * rows]).sum().backward()
        bn = model[0]
        return {"y": y.detach(), "grad_x": local.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var, "type": type(bn).__name__}
    return check


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_sync_batchnorm_two_ranks_equals_batchnorm_on_the_global_batch(kind):
    ranks = run_ranks(_sync_bn_rank(kind), world_size=2)
    x, upstream = _global_batch(SHAPES[kind])
    x.requires_grad_()
    bn = _bn(kind, x.shape[1])
    y = bn(x)
    (y * upstream).sum().backward()
    assert ranks[0]["type"] == "GlooSyncBatchNorm"
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), x.grad)
    # Parameter gradients stay local; the sum over ranks (DDP's average, times 2) is the global one.
    torch.testing.assert_close(ranks[0]["grad_w"] + ranks[1]["grad_w"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["grad_b"] + ranks[1]["grad_b"], bn.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def test_conversion_keeps_parameters_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    weight, keys = model[1].weight, list(model.state_dict())
    converted = dist.convert_sync_batchnorm(model, process_group=None, device=torch.device("cpu"))
    assert converted[1].weight is weight and list(converted.state_dict()) == keys
    assert [type(m).__name__ for m in converted.modules()].count("GlooSyncBatchNorm") == 2
    x = torch.randn(4, 3, 6, 6)
    converted.eval(), model.eval()  # one process, no group: plain batch norm
    assert torch.equal(converted[1](converted[0](x)), nn.functional.batch_norm(
        converted[0](x), model[1].running_mean, model[1].running_var, weight, model[1].bias))


@pytest.mark.parametrize("group_size, local, expected", [
    (-1, 2, [[0, 1], [2, 3]]), (0, 2, [[0, 1, 2, 3]]), (2, 4, [[0, 1], [2, 3]]), (1, 4, [[0], [1], [2], [3]]),
    (4, 2, [[0, 1, 2, 3]]), (-1, 4, [[0, 1, 2, 3]])])
def test_sync_bn_group_size_semantics(group_size, local, expected):
    assert dist.sync_bn_rank_groups(world_size=4, local_world_size=local, group_size=group_size) == expected


@pytest.mark.parametrize("group_size", [3, -2])
def test_sync_bn_group_size_errors(group_size):
    with pytest.raises(ValueError, match="GROUP_SIZE"):
        dist.sync_bn_rank_groups(world_size=4, local_world_size=2, group_size=group_size)


def _group_members(rank, world_size):
    found = {}
    for group_size, local in ((2, 4), (-1, 2), (0, 4)):
        group = dist.sync_bn_process_group(rank=rank, world_size=world_size, local_world_size=local,
                                           group_size=group_size)
        found[group_size] = None if group is None else torch_dist.get_process_group_ranks(group)
    # Statistics are shared inside a group only: all-reduce each rank's number over its BN group.
    value = torch.tensor([float(rank)])
    torch_dist.all_reduce(value, group=dist.sync_bn_process_group(rank=rank, world_size=world_size,
                                                                  local_world_size=4, group_size=2))
    found["sum"] = value.item()
    return found


def test_sync_bn_process_groups_on_four_ranks():
    ranks = run_ranks(_group_members, world_size=4)
    assert [r[2] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[-1] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r[0] is None for r in ranks)  # all processes: the default group
    assert [r["sum"] for r in ranks] == [1.0, 1.0, 5.0, 5.0]


def _stop_votes(rank, world_size):
    stop = dist.StopOnSignal(check_every=3)
    try:
        votes = [stop()]
        if rank == 1:  # only rank 1 is signalled: every rank must still stop at the same call
            os.kill(os.getpid(), signal.SIGTERM)
        votes += [stop() for _ in range(4)]
        return votes
    finally:
        stop.close()


def test_stop_is_agreed_at_the_next_vote_when_one_rank_is_signalled():
    ranks = run_ranks(_stop_votes, world_size=2)
    assert ranks[0] == ranks[1] == [False, False, True, True, True]


def test_stop_on_one_process_is_immediate_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = dist.StopOnSignal(check_every=10)
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop() and stop.stopped
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def _wait_for_a_silent_rank(flag):
    def check(rank, world_size):
        if rank == 1:  # never joins the collective; leaves once rank 0 has given up
            while not flag.exists():
                time.sleep(0.05)
            return None
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            torch_dist.all_reduce(torch.ones(1))
        flag.touch()
        return time.monotonic() - start
    return check


def test_collective_timeout_bounds_the_wait_for_a_missing_rank(tmp_path):
    # init_process_group(timeout_s=2): the survivor's collective raises instead of hanging.
    waited = run_ranks(_wait_for_a_silent_rank(tmp_path / "gave_up"), world_size=2, timeout_s=2.0)
    assert 1.5 < waited[0] < 10
