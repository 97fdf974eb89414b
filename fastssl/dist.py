"""Process groups, SyncBN, DDP and the agreed stop for the trainer (issue 4).

One process per device. A worker learns its place from torchrun-style variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which torchrun sets, which
fastssl.launch sets for the workers it spawns and which it derives from SLURM's variables under
srun. A single-process run has none of them and never creates a process group.
"""
from __future__ import annotations

import datetime
import inspect
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """Read torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) if present."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))


def init_process_group(info: DistInfo, *, backend: str, init_method: str, device: torch.device,
                       timeout_s: float | None) -> None:
    """Join the default group of ``info.world_size`` processes at MASTER_ADDR:MASTER_PORT.

    backend: nccl or gloo; gloo wherever the device is not CUDA (nccl cannot run there).
    init_method: "env" (env://) or "tcp" (tcp://MASTER_ADDR:MASTER_PORT): the same rendezvous,
        since the launcher always exports the address (VISSL's RUN_ID) as MASTER_ADDR/MASTER_PORT.
    timeout_s: how long a collective may wait for a missing rank before it raises (gloo) or the
        NCCL watchdog aborts the process; None keeps torch's default. This bounds the hang of the
        survivors when a rank dies outside a launcher that tears the job down.
    """
    if info.world_size == 1 or dist.is_initialized():
        return
    if init_method not in ("env", "tcp"):
        raise ValueError(f"DISTRIBUTED.INIT_METHOD must be env or tcp, got {init_method!r}")
    if not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        raise ValueError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun, "
                         "or set config.DISTRIBUTED.RUN_ID=host:port")
    url = "env://" if init_method == "env" else f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        options["device_id"] = device  # binds the NCCL communicator to this GPU, created eagerly
    dist.init_process_group("nccl" if device.type == "cuda" and backend == "nccl" else "gloo",
                            init_method=url, rank=info.rank, world_size=info.world_size, **options)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def global_group():
    """The group SwAV's Sinkhorn equipartitions over: every rank (None on one process)."""
    return dist.group.WORLD if dist.is_initialized() else None


def control_group(device: torch.device):
    """A gloo group for host-side flags (the stop vote): None (the default group) when that is gloo.

    On NCCL runs a CPU tensor cannot go through the default group, and a CUDA flag would make the
    vote wait for the GPU queue; the gloo group votes between host threads only.
    """
    if not dist.is_initialized() or device.type != "cuda":
        return None
    return dist.new_group(backend="gloo")


# ---------------------------------------------------------------------------------------------
# SyncBN
# ---------------------------------------------------------------------------------------------

def sync_bn_rank_groups(*, world_size: int, local_world_size: int, group_size: int) -> list[list[int]]:
    """MODEL.SYNC_BN_CONFIG.GROUP_SIZE as lists of ranks that share batch statistics.

    -1: the processes of one node (local_world_size consecutive ranks); 0: all processes; >0:
    groups of that many consecutive ranks, which must divide world_size.
    """
    size = {-1: local_world_size, 0: world_size}.get(group_size, group_size)
    if size < 1:
        raise ValueError(f"MODEL.SYNC_BN_CONFIG.GROUP_SIZE must be -1, 0 or positive, got {group_size}")
    if size > world_size:  # a seed recipe run on fewer GPUs than it was written for (VISSL's pages vary one key)
        if os.environ.get("RANK", "0") == "0":
            print(f"fastssl: MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size} is larger than the {world_size} processes "
                  "of this run: batch statistics are shared by all of them", file=sys.stderr, flush=True)
        size = world_size
    if world_size % size:
        raise ValueError(f"MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size} means groups of {size} processes, "
                         f"which do not divide the world size {world_size}")
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def sync_bn_process_group(*, rank: int, world_size: int, local_world_size: int, group_size: int):
    """This rank's SyncBN group (None: the default group, i.e. all ranks).

    Every rank creates every group, in the same order: dist.new_group is collective.
    """
    ranks = sync_bn_rank_groups(world_size=world_size, local_world_size=local_world_size, group_size=group_size)
    if len(ranks) == 1:
        return None
    own = None
    for members in ranks:
        group = dist.new_group(members)
        if rank in members:
            own = group
    return own


class _GlooSyncBatchNorm(torch.autograd.Function):
    """Batch norm with statistics over every rank of ``group``, for CPU tensors (torch's
    SyncBatchNorm kernels are CUDA-only). Same maths as torch's: the forward combines per-rank
    (count, mean, biased var); the backward all-reduces sum(dy) and sum(dy * x_hat) so that the
    input gradient is that of the summed per-rank losses, while the weight and bias gradients stay
    local (DDP then averages them like every other gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() // channels, dtype=x.dtype)
        stats = torch.cat((count, x.mean(dims), x.var(dims, unbiased=False)))  # (2C + 1,)
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, stats, group=group)
        gathered = torch.stack(parts)  # (W, 2C + 1)
        counts, means, variances = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total  # (C,)
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total  # (C,), parallel-variance merge
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * total / (total - 1), alpha=momentum)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, total)
        ctx.group, ctx.shape = group, shape
        y = x_hat if weight is None else x_hat * weight.view(shape)
        return y if bias is None else y + bias.view(shape)

    @staticmethod
    def backward(ctx, grad_y):
        x_hat, weight, invstd, total = ctx.saved_tensors
        shape, channels = ctx.shape, x_hat.shape[1]
        dims = [0, *range(2, x_hat.dim())]
        sum_dy, sum_dy_xhat = grad_y.sum(dims), (grad_y * x_hat).sum(dims)
        grad_weight = sum_dy_xhat if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        reduced = torch.cat((sum_dy, sum_dy_xhat))
        dist.all_reduce(reduced, group=ctx.group)
        mean_dy, mean_dy_xhat = (reduced / total).split(channels)
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad_y - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) * scale.view(shape)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm for CPU processes (gloo): same parameters, buffers and state_dict keys.

    Not a SyncBatchNorm subclass on purpose: DDP refuses SyncBatchNorm modules on CPU.
    """

    def __init__(self, num_features: int, *, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size(self.process_group) > 1):
            return super().forward(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        # momentum None (cumulative average) reads the counter: a host read, free on the CPU.
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return _GlooSyncBatchNorm.apply(input, self.weight, self.bias,
                                        self.running_mean if self.track_running_stats else None,
                                        self.running_var if self.track_running_stats else None,
                                        self.eps, momentum, self.process_group)


def _to_gloo_sync_bn(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        converted = GlooSyncBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum,
                                      affine=module.affine, track_running_stats=module.track_running_stats,
                                      process_group=process_group)
        if module.affine:  # the same Parameter objects: an optimizer built before still holds them
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _to_gloo_sync_bn(child, process_group))
    return module


def convert_sync_batchnorm(model: nn.Module, *, process_group, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` -> torch.nn.SyncBatchNorm over ``process_group`` (CUDA), or
    GlooSyncBatchNorm, the same computation for CPU processes. Parameters are kept, not copied."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _to_gloo_sync_bn(model, process_group)


def wrap_ddp(model: nn.Module, *, device: torch.device) -> nn.Module:
    """DDP around the trainable model only (STYLE.md): its gradients are averaged over all ranks.

    Method state (SwAV's queue, NPID's memory bank, DeepClusterV2's centroids) lives on the method,
    never in the model, so DDP neither broadcasts nor averages it: each rank's queue holds its own
    past embeddings, and the kernels combine ranks where the algorithm says so (Sinkhorn over the
    global batch). broadcast_buffers=False: the model's only buffers are BatchNorm statistics;
    with SyncBN over all ranks they agree by construction, with smaller SyncBN groups or plain BN
    each group keeps its own (as the statistics it normalised with), and rank 0's are checkpointed.
    That also saves a broadcast of every buffer at every forward.
    """
    # torch >= 2.14 renames broadcast_buffers (which it still accepts, with a warning).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGUSR1 -> checkpoint at an agreed step boundary, then a clean exit
# ---------------------------------------------------------------------------------------------

class StoppedDuringSetup(BaseException):
    """SIGTERM / SIGUSR1 before the first step (see StopOnSignal). A BaseException, as KeyboardInterrupt is,
    so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """LoopSettings.stop_requested: True once a rank has received SIGTERM or SIGUSR1.

    The engine calls it once per step on every rank. On one process it reads a Python flag (no
    sync). On several, ranks must agree on the step to stop at (rank 0 checkpoints, every rank
    returns), but the signal reaches them at different moments; so every ``check_every`` calls the
    ranks take a MAX vote over ``group``: a gloo all-reduce of one integer between host threads,
    which never waits for the GPU queue, and otherwise answer False without communicating. The
    stop therefore lands within ``check_every`` steps of the first signal (LOG_FREQUENCY steps;
    SLURM's grace time is tens of seconds). A second signal changes nothing: SLURM and torchrun
    can both deliver one, and the checkpoint must still be written.

    Install it before the DataLoader forks its workers: they inherit the handler, so a SIGUSR1
    sent to the whole process group does not kill them (torch's workers handle SIGTERM themselves).

    During set-up (from here until ``setup_done()`` or the first call) there is nothing to checkpoint, and
    building the data and the model can take minutes: the first signal then raises StoppedDuringSetup at
    once, and the run ends, its ``finally`` clauses cleaning up (a later signal is only recorded, so that
    they run to the end).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, *, check_every: int, group=None):
        self.check_every = max(1, check_every)
        self.group = group
        self.received: int | None = None
        self.stopped = False
        self.setting_up = True
        self._calls = 0
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if self.setting_up:
            self.setting_up = False
            raise StoppedDuringSetup(signum)

    def setup_done(self) -> None:
        """From now on a signal is recorded, and the loop stops at an agreed step with a checkpoint."""
        self.setting_up = False

    def __call__(self) -> bool:
        self.setting_up = False
        self._calls += 1
        if not (dist.is_initialized() and dist.get_world_size(self.group) > 1):
            self.stopped = self.received is not None
        elif self._calls % self.check_every == 0:
            vote = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
            self.stopped = bool(vote.item())  # sync: host-only gloo vote once per check_every steps
        return self.stopped

    def close(self) -> None:
        """Restore the previous handlers (a later run in the same process installs its own)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
