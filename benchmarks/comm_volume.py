"""Bytes each collective moves per training step, and the scaling efficiency they imply.

    python -m benchmarks.comm_volume [--step-ms 70] [--gpus 8 64 512] [--sync-bn-group 8]

SwAV ResNet-50 as in the seed config (pretrain/swav/swav_8node_resnet: 2x224 + 6x96 crops, 64
images per GPU, 3000 prototypes, 3 Sinkhorn iterations on 2 crops, SyncBN in groups of 8). Counts
come from the real model, built on the meta device; times are a model, not a measurement:

    all-reduce of S bytes over G GPUs (ring):  2 (G-1)/G * S / bandwidth + 2 ceil(log2 G) * latency
    all-gather of s bytes per GPU over G GPUs: (G-1) * s / bandwidth    +   ceil(log2 G) * latency

Bandwidth: NVLink 450 GB/s per GPU inside an 8-GPU H100 node; InfiniBand 50 GB/s per GPU (one
400 Gb/s NIC each) once a group spans nodes. Latency per step: 3 us (NVLink), 5 us (IB): small
collectives (SyncBN statistics, Sinkhorn sums) are latency-bound and sit on the critical path;
the gradient all-reduce runs in DDP's 25 MB buckets behind the backward pass (about 2/3 of the
step), so only what outlasts the backward, plus the last bucket, is exposed.
The step time without communication is an assumption (--step-ms): see STEP_MS_ASSUMPTION.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys

import torch

from benchmarks.kernels import git_commit, machine
from fastssl.config import compose_config
from fastssl.run_model import build_run_model, resolve_head_params

NVLINK_BYTES_PER_S = 450e9
IB_BYTES_PER_S = 50e9
LATENCY_S = {"NVLink": 3e-6, "IB": 5e-6}
GPUS_PER_NODE = 8
BUCKET_BYTES = 25 * 2**20        # DDP's default bucket_cap_mb
BACKWARD_SHARE = 2 / 3           # of the step: the window the gradient all-reduce can hide in
STEP_MS_ASSUMPTION = (
    "70 ms: one H100 SXM, bf16 autocast, channels_last. ResNet-50 trains at about 3,000 images/s at "
    "224 px on an H100; FLOPs scale with pixels, so 2x224 + 6x96 is 2 + 6 (96/224)^2 = 3.1 224-px images, "
    "x 64 = 198 per step = 66 ms, rounded up for the head, Sinkhorn and the optimizer. Replace with a "
    "measured single-GPU step time (--step-ms).")
SEED = ["config=pretrain/swav/swav_8node_resnet"]


def link(group_size: int) -> str:
    return "NVLink" if group_size <= GPUS_PER_NODE else "IB"


def all_reduce(num_bytes: float, group_size: int) -> tuple[float, float]:
    """(bytes each GPU sends, seconds) for a ring all-reduce of ``num_bytes``."""
    if group_size == 1:
        return 0.0, 0.0
    sent = 2 * (group_size - 1) / group_size * num_bytes
    bandwidth = NVLINK_BYTES_PER_S if link(group_size) == "NVLink" else IB_BYTES_PER_S
    return sent, sent / bandwidth + 2 * math.ceil(math.log2(group_size)) * LATENCY_S[link(group_size)]


def all_gather(num_bytes_per_gpu: float, group_size: int) -> tuple[float, float]:
    """(bytes each GPU receives, seconds) for an all-gather of ``num_bytes_per_gpu`` from every GPU."""
    if group_size == 1:
        return 0.0, 0.0
    moved = (group_size - 1) * num_bytes_per_gpu
    bandwidth = NVLINK_BYTES_PER_S if link(group_size) == "NVLink" else IB_BYTES_PER_S
    return moved, moved / bandwidth + math.ceil(math.log2(group_size)) * LATENCY_S[link(group_size)]


def step_collectives(cfg) -> list[dict]:
    """The collectives of one SwAV step: name, calls per step, payload per call, kind, scope."""
    model = build_run_model(cfg, head_params=resolve_head_params(cfg), on_meta=True)
    batchnorms = (torch.nn.modules.batchnorm._BatchNorm,)
    trunk_bn = [m.num_features for m in model.trunk.modules() if isinstance(m, batchnorms)]
    head_bn = [m.num_features for m in model.heads.modules() if isinstance(m, batchnorms)]
    sizes = cfg.DATA.TRAIN.TRANSFORMS[0].size_crops  # one trunk forward per resolution
    bn_calls = [c for c in trunk_bn for _ in sizes] + head_bn
    num_params = sum(p.numel() for p in model.parameters())
    loss = cfg.LOSS.swav_loss
    head = cfg.MODEL.HEAD.PARAMS[-1][1]
    sinkhorn_calls = 2 * loss.num_iters * len(loss.crops_for_assign) * len(head.num_clusters)  # max + sum
    # torch's SyncBatchNorm: forward all-gathers (mean, invstd, count) = 2C + 1 floats per GPU; backward
    # all-reduces (sum dy, sum dy * x_mu) = 2C floats. Statistics are float32 under autocast.
    return [
        {"name": "gradient all-reduce (fp32)", "calls": 1, "bytes": 4 * num_params, "kind": "all_reduce",
         "scope": "world", "overlaps_backward": True, "params": num_params},
        {"name": "SyncBN forward all-gather", "calls": len(bn_calls), "bytes": [4 * (2 * c + 1) for c in bn_calls],
         "kind": "all_gather", "scope": "sync_bn"},
        {"name": "SyncBN backward all-reduce", "calls": len(bn_calls), "bytes": [4 * 2 * c for c in bn_calls],
         "kind": "all_reduce", "scope": "sync_bn"},
        {"name": "Sinkhorn row sums + max", "calls": sinkhorn_calls, "bytes": 4 * max(head.num_clusters),
         "kind": "all_reduce", "scope": "world"},
        # SwAV's queue stays on its rank (queue_length / world_size rows each): it reaches the other
        # ranks only through the Sinkhorn sums above, so it gathers nothing.
        {"name": "SwAV queue gather", "calls": 0, "bytes": 0, "kind": "all_reduce", "scope": "world"},
    ]


def cost(item: dict, *, world: int, sync_bn_group: int) -> tuple[float, float]:
    """(megabytes sent or received per GPU per step, seconds per step) of one collective."""
    group = world if item["scope"] == "world" else min(sync_bn_group or world, world)
    operation = all_reduce if item["kind"] == "all_reduce" else all_gather
    payloads = item["bytes"] if isinstance(item["bytes"], list) else [item["bytes"]] * item["calls"]
    if item.get("overlaps_backward"):  # DDP sends the gradients bucket by bucket
        buckets = math.ceil(item["bytes"] / BUCKET_BYTES)
        payloads = [item["bytes"] / buckets] * buckets
    moved = [operation(b, group) for b in payloads]
    return sum(m for m, _ in moved) / 1e6, sum(t for _, t in moved)


def efficiency(items: list[dict], *, world: int, sync_bn_group: int, step_s: float) -> dict:
    """Throughput per GPU relative to one GPU, with the gradient all-reduce hidden where it can be."""
    critical = sum(cost(i, world=world, sync_bn_group=sync_bn_group)[1] for i in items
                   if not i.get("overlaps_backward"))
    gradients = next(i for i in items if i.get("overlaps_backward"))
    gradient_s = cost(gradients, world=world, sync_bn_group=sync_bn_group)[1]
    buckets = math.ceil(gradients["bytes"] / BUCKET_BYTES)
    exposed = max(gradient_s - BACKWARD_SHARE * step_s, 0.0) + (gradient_s / buckets if world > 1 else 0.0)
    return {"critical_path_ms": 1e3 * critical, "gradient_ms": 1e3 * gradient_s, "exposed_gradient_ms": 1e3 * exposed,
            "efficiency": step_s / (step_s + critical + exposed),
            "efficiency_without_overlap": step_s / (step_s + critical + gradient_s)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.comm_volume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-ms", type=float, default=70.0, help="step time without communication (ms)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--sync-bn-group", type=int, default=None,
                        help="SyncBN GROUP_SIZE (default: the seed config's; 0 = all GPUs)")
    args = parser.parse_args(argv)
    cfg = compose_config(SEED)
    sync_bn_group = cfg.MODEL.SYNC_BN_CONFIG.GROUP_SIZE if args.sync_bn_group is None else args.sync_bn_group
    items = step_collectives(cfg)
    step_s = args.step_ms / 1e3

    header = f"{'collective':<30}{'calls':>6}{'payload/call':>14}" + "".join(
        f"{f'{n} GPUs: MB/GPU':>17}{'ms':>8}" for n in args.gpus)
    print(f"SwAV ResNet-50, 2x224+6x96, batch 64/GPU, 3000 prototypes, SyncBN group {sync_bn_group or 'all'}, "
          f"step {args.step_ms:g} ms without communication")
    print(header)
    rows = []
    for item in items:
        sizes = item["bytes"] if isinstance(item["bytes"], list) else [item["bytes"]]
        payload = sum(sizes) / max(len(sizes), 1)
        figures = {n: cost(item, world=n, sync_bn_group=sync_bn_group) for n in args.gpus}
        size = f"{payload / 1e6:.1f} MB" if payload >= 1e6 else f"{payload / 1e3:.1f} kB"
        print(f"{item['name']:<30}{item['calls']:>6}{size:>14}" + "".join(
            f"{mb:>17.2f}{1e3 * s:>8.2f}" for mb, s in figures.values()))
        rows.append({"collective": item["name"], "calls_per_step": item["calls"], "mean_payload_bytes": payload,
                     "per_gpus": {str(n): {"megabytes_per_gpu": mb, "ms": 1e3 * s} for n, (mb, s) in figures.items()}})
    scaling = {str(n): efficiency(items, world=n, sync_bn_group=sync_bn_group, step_s=step_s) for n in args.gpus}
    for key, label in (("critical_path_ms", "SyncBN + Sinkhorn (critical path, ms)"),
                       ("exposed_gradient_ms", "gradients not hidden by backward (ms)"),
                       ("efficiency", "scaling efficiency (DDP overlap)"),
                       ("efficiency_without_overlap", "scaling efficiency (no overlap)")):
        print(f"{label:<50}" + "".join(f"{scaling[str(n)][key]:>25.3f}" for n in args.gpus))
    record = {"benchmark": "comm_volume", "machine": machine(torch.device("cpu")), "commit": git_commit(),
              "command": shlex.join(sys.argv) if argv is None else shlex.join(["benchmarks.comm_volume.main", *argv]),
              "assumptions": {"step_ms": args.step_ms, "step_ms_basis": STEP_MS_ASSUMPTION,
                              "nvlink_GB_s_per_gpu": NVLINK_BYTES_PER_S / 1e9, "ib_GB_s_per_gpu": IB_BYTES_PER_S / 1e9,
                              "latency_us": {k: v * 1e6 for k, v in LATENCY_S.items()}, "gpus_per_node": GPUS_PER_NODE,
                              "sync_bn_group": sync_bn_group, "parameters": items[0]["params"]},
              "results": rows, "scaling": scaling}
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
