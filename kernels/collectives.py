"""Collective helpers that degrade to no-ops on one process.

Every helper takes an optional ``group`` (a ``torch.distributed`` ProcessGroup, or None for the
default group). When torch.distributed is not initialised, or the group holds a single rank, the
helpers return their input unchanged, so kernels written with them run as-is on one device.

Ranks are assumed to hold tensors of equal shape (equal per-rank batch sizes): this keeps the
gathers free of a size exchange, which would be a host sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised and ``group`` holds more than one rank."""
    return world_size(group) > 1


def world_size(group=None) -> int:
    """Number of ranks in ``group``; 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    """This process's rank within ``group``; 0 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place; returns ``tensor`` for chaining."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over the ranks of ``group`` in place; returns ``tensor``."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order, without gradient.

    tensor: (B, ...) with the same shape on every rank. Returns (world_size * B, ...).
    """
    if not is_distributed(group):
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=0)


class _AllGatherCatWithGrad(torch.autograd.Function):
    """Gather-and-concatenate whose backward routes each rank's gradient slice home.

    Every rank computes its own loss from the gathered tensor, and the total objective is the sum
    of those losses; so the gradient of this rank's input is the sum over ranks of the gradients
    flowing into this rank's slice of the gathered tensor: an all-reduce, then a slice.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.local_rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered):
        # A copy: autograd may hand the same gradient buffer to other consumers.
        grad_gathered = grad_gathered.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad_gathered, op=dist.ReduceOp.SUM, group=ctx.group)
        start = rank(ctx.group) * ctx.local_rows
        return grad_gathered[start : start + ctx.local_rows], None


def all_gather_cat_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably.

    tensor: (B, ...) with the same shape on every rank. Returns (world_size * B, ...). The backward
    pass sums the incoming gradients over ranks and returns this rank's (B, ...) slice, so the
    gradient equals the single-process gradient of the summed per-rank losses.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherCatWithGrad.apply(tensor, group)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy; returns ``tensor``.

    src: the source rank within ``group``.
    """
    if is_distributed(group):
        global_src = src if group is None else dist.get_global_rank(group, src)
        dist.broadcast(tensor, src=global_src, group=group)
    return tensor
