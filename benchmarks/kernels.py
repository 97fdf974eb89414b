"""Kernel benchmark: fastssl's NPID step and k-means against straightforward baselines, side by side.

    python -m benchmarks.kernels [--quick] [--device cpu|cuda]     (fastssl-bench kernels)

(a) NPID step: sample negatives, read the (B, K+1, D) bank rows, score, momentum-update the batch
    rows. Baseline: negatives drawn on the host and turned into a tensor from a Python list, the
    update a Python loop over the batch.
(b) DeepClusterV2 k-means (3 heads, 10 iterations). Baseline: the same E-step, but the M-step loops
    over clusters in Python (centroid[k] = x[assignments == k].mean(0)). The M-step alone is also
    timed, since it is the only part that differs.

Prints a table (time per call, speed-up = baseline / fastssl) and one JSON line with the machine,
commit, command line and figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kernels.kmeans import assign, spherical_kmeans, update_centroids
from kernels.memory_bank import gather_rows, init_memory_bank, sample_negatives, update_memory_bank

MOMENTUM = 0.5
TEMPERATURE = 0.07
FULL = {
    "npid": {"num_samples": [10_000, 100_000, 1_000_000], "batch_size": 256, "num_negatives": 4096, "dim": 128},
    "kmeans": {"num_samples": [10_000, 100_000], "num_clusters": [300, 3000], "heads": 3, "iters": 10, "dim": 128},
}
QUICK = {
    "npid": {"num_samples": [1_000, 10_000], "batch_size": 16, "num_negatives": 128, "dim": 32},
    "kmeans": {"num_samples": [1_000], "num_clusters": [10, 100], "heads": 3, "iters": 2, "dim": 32},
}


# ---------------------------------------------------------------- NPID step


def npid_step(bank, indices, embeddings, *, num_negatives, generator):
    negatives = sample_negatives(bank.shape[0], len(indices), num_negatives, generator=generator, device=bank.device)
    index = torch.cat([indices.unsqueeze(1), negatives], dim=1)  # (B, K+1), the positive first
    scores = torch.bmm(gather_rows(bank, index), embeddings.unsqueeze(2)).squeeze(2) / TEMPERATURE  # (B, K+1)
    update_memory_bank(bank, indices, embeddings, momentum=MOMENTUM)
    return scores


def npid_step_baseline(bank, indices, embeddings, *, num_negatives, rng):
    negatives = rng.integers(0, bank.shape[0], size=(len(indices), num_negatives)).tolist()
    index = torch.tensor([[i] + row for i, row in zip(indices.tolist(), negatives)], device=bank.device)
    scores = torch.bmm(bank[index], embeddings.unsqueeze(2)).squeeze(2) / TEMPERATURE  # (B, K+1)
    for row, i in enumerate(indices.tolist()):
        v = MOMENTUM * bank[i] + (1 - MOMENTUM) * embeddings[row]
        bank[i] = v / v.norm()
    return scores


# ---------------------------------------------------------------- k-means


def m_step_baseline(x, assignments, centroids):
    centroids = centroids.clone()
    for k in range(centroids.shape[0]):
        members = x[assignments == k]
        if len(members) > 0:
            centroids[k] = members.mean(dim=0)
    return F.normalize(centroids, dim=1)


def kmeans_baseline(x, *, num_clusters, num_iters, generator):
    all_centroids, all_assignments = [], []
    for k in num_clusters:
        centroids = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)]
        for _ in range(num_iters):
            centroids = m_step_baseline(x, assign(x, centroids), centroids)
        all_centroids.append(centroids)
        all_assignments.append(assign(x, centroids))
    return all_centroids, all_assignments


# ---------------------------------------------------------------- harness


def seconds_per_call(fn, *, device, repeats, warmup):
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_npid(device, sizes, repeats):
    """Yields one row per dataset size."""
    cpu_generator = torch.Generator().manual_seed(0)
    for num_samples in sizes["num_samples"]:
        bank = init_memory_bank(num_samples, sizes["dim"], generator=cpu_generator, device=device)
        indices = torch.randperm(num_samples, generator=cpu_generator)[: sizes["batch_size"]].to(device)
        embeddings = torch.randn(sizes["batch_size"], sizes["dim"], generator=cpu_generator)
        embeddings = F.normalize(embeddings, dim=1).to(device)
        generator = torch.Generator(device=device).manual_seed(0)
        rng = np.random.default_rng(0)
        k = sizes["num_negatives"]
        fast = seconds_per_call(lambda: npid_step(bank, indices, embeddings, num_negatives=k, generator=generator),
                                device=device, repeats=repeats, warmup=1)
        base = seconds_per_call(lambda: npid_step_baseline(bank, indices, embeddings, num_negatives=k, rng=rng),
                                device=device, repeats=repeats, warmup=1)
        size = f"N={num_samples:,} B={sizes['batch_size']} K={k} D={sizes['dim']}"
        yield {"case": "npid_step", "size": size, "fast_s": fast, "baseline_s": base}
        del bank


def bench_kmeans(device, sizes, repeats):
    """Yields a whole-k-means row and an M-step row per (N, K)."""
    data_generator = torch.Generator().manual_seed(0)
    # Both sides draw the same initial picks, so they iterate over the same clusters.
    picks = lambda: torch.Generator().manual_seed(1)
    for num_samples in sizes["num_samples"]:
        x = F.normalize(torch.randn(num_samples, sizes["dim"], generator=data_generator), dim=1).to(device)
        for k in sizes["num_clusters"]:
            heads = [k] * sizes["heads"]
            fast = seconds_per_call(
                lambda: spherical_kmeans(x, num_clusters=heads, num_iters=sizes["iters"], generator=picks()),
                device=device, repeats=repeats, warmup=0)
            base = seconds_per_call(
                lambda: kmeans_baseline(x, num_clusters=heads, num_iters=sizes["iters"], generator=picks()),
                device=device, repeats=repeats, warmup=0)
            size = f"N={num_samples:,} {sizes['heads']}x{k} iters={sizes['iters']} D={sizes['dim']}"
            yield {"case": "kmeans", "size": size, "fast_s": fast, "baseline_s": base}

            centroids = x[:k].clone()
            assignments = assign(x, centroids)
            fast = seconds_per_call(lambda: update_centroids(x, assignments, centroids),
                                    device=device, repeats=3, warmup=1)
            base = seconds_per_call(lambda: m_step_baseline(x, assignments, centroids),
                                    device=device, repeats=3, warmup=1)
            size = f"N={num_samples:,} K={k} D={sizes['dim']}"
            yield {"case": "kmeans_m_step", "size": size, "fast_s": fast, "baseline_s": base}


def machine(device):
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else []
        device_name = names[0] if names else platform.processor() or "cpu"
    # The load average says whether other processes shared the CPU while this ran.
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": load,
            "torch": torch.__version__, "device": str(device), "device_name": device_name}


def git_commit():
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


TABLE_HEADER = f"{'case':<15}{'size':<42}{'fastssl (ms)':>14}{'baseline (ms)':>15}{'speed-up':>10}"


def table_line(row):
    return (f"{row['case']:<15}{row['size']:<42}{row['fast_s'] * 1e3:>14.2f}"
            f"{row['baseline_s'] * 1e3:>15.2f}{row['speedup']:>9.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastssl-bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's); 1 is steadier on a shared machine")
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run_benchmarks(args, argv)
    finally:
        torch.set_num_threads(previous_threads)  # main() may be called in-process (smoke test)


def run_benchmarks(args, argv):
    """Times every case, prints the table row by row, then the JSON record; returns the record."""
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    repeats = 2 if args.quick else 3

    # Rows are printed as they complete: the full run takes minutes on a CPU.
    print(TABLE_HEADER, flush=True)
    rows = []
    for row in itertools.chain(bench_npid(device, sizes["npid"], repeats),
                               bench_kmeans(device, sizes["kmeans"], 2 if args.quick else 1)):
        row["speedup"] = row["baseline_s"] / row["fast_s"]
        print(table_line(row), flush=True)
        rows.append(row)
    record = {
        "benchmark": "kernels",
        "machine": machine(device),
        "commit": git_commit(),
        "command": shlex.join(sys.argv) if argv is None else shlex.join(["benchmarks.kernels.main", *argv]),
        "results": rows,
    }
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
