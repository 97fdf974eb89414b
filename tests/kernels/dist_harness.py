"""Run a function on N gloo ranks on the CPU and collect what each rank returns.

    results = run_on_ranks(check_fn, world_size=2)  # [rank 0's return value, rank 1's, ...]

``check_fn(rank, world_size)`` runs inside an initialised gloo default group on 127.0.0.1; its return value is
saved with torch.save and handed back. A failing rank's traceback is raised in the caller; a hang
is killed after ``timeout_s``.

The ranks are forked by default: importing torch takes seconds on a 2-core CI machine, and two
spawned processes importing it at once cost ~10 s per test. Forking is safe here because the
children run on the CPU with one intra-op thread (as DataLoader workers do) and the parent never
initialises CUDA or a process group. Pass ``start_method="spawn"`` (then ``check_fn`` must be a
module-level function, since it is pickled) to run from a process that has touched CUDA.
"""
from __future__ import annotations

import datetime
import multiprocessing
import socket
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, out_dir: str, timeout_s: float) -> None:
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            result = fn(rank, world_size)
        finally:
            torch.distributed.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)


def run_on_ranks(fn, *, world_size: int, timeout_s: float = 60.0, start_method: str = "fork") -> list:
    """Run ``fn(rank, world_size)`` on ``world_size`` gloo processes; return their results in rank order."""
    context = multiprocessing.get_context(start_method)
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, port, out_dir, timeout_s), daemon=True)
            for rank in range(world_size)
        ]
        with warnings.catch_warnings():
            # Python >= 3.12 warns that fork() from a multi-threaded process may deadlock: see above.
            warnings.simplefilter("ignore", DeprecationWarning)
            for process in processes:
                process.start()
        deadline = time.monotonic() + timeout_s
        try:
            # Stop at the first failure: the other ranks would wait in a collective until timeout.
            while any(p.is_alive() for p in processes):
                if any(p.exitcode not in (None, 0) for p in processes) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
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
            raise RuntimeError(f"ranks did not finish within {timeout_s} s (exit codes {codes})")
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]

