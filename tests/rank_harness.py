"""Run a function on N CPU ranks forked from the test process, as torchrun would start them.

    results = run_ranks(fn, world_size=2)   # [fn(0, 2), fn(1, 2)], each in its own process

Each rank gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); with ``init_group`` it also joins a gloo default group through fastssl.dist. Ranks
are forked (no second import of torch: seconds on a 2-core machine); they run on one thread each.
``while_running(processes)`` is called once the ranks have started (to signal one of them).
A failing rank's traceback is raised here; ranks still alive at the end are killed.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from fastssl import dist
from fastssl.launch import free_port


def _rank_main(fn, rank: int, world_size: int, port: int, out_dir: str, init_group: bool, timeout_s: float):
    out = Path(out_dir)
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        if init_group:
            dist.init_process_group(dist.from_environment(), backend="gloo", init_method="env",
                                    device=torch.device("cpu"), timeout_s=timeout_s)
        try:
            result = fn(rank, world_size)
        finally:
            dist.shutdown()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)


def run_ranks(fn, *, world_size: int, init_group: bool = True, timeout_s: float = 60.0, deadline_s: float = 60.0,
              while_running=None) -> list:
    """``fn(rank, world_size)`` on ``world_size`` forked ranks; their return values in rank order.

    timeout_s: the process group's collective timeout; deadline_s: when the ranks are killed.
    """
    context = multiprocessing.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [context.Process(target=_rank_main, daemon=True,
                                     args=(fn, rank, world_size, port, out_dir, init_group, timeout_s))
                     for rank in range(world_size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process: see above
            for process in processes:
                process.start()
        deadline = time.monotonic() + deadline_s
        try:
            if while_running is not None:
                while_running(processes)
            while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
                if any(p.exitcode not in (None, 0) for p in processes):
                    break
                time.sleep(0.02)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
        errors = sorted(Path(out_dir).glob("rank*.err"))
        if errors:
            raise RuntimeError("\n".join(f"{e.stem} failed:\n{e.read_text()}" for e in errors))
        if any(p.exitcode != 0 for p in processes):
            codes = [p.exitcode for p in processes]
            raise RuntimeError(f"ranks did not finish within {deadline_s} s (exit codes {codes})")
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
