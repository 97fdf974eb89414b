"""Start the worker processes of a run, or join the ones a launcher started (issue 4).

    fastssl-train ... config.DISTRIBUTED.NUM_PROC_PER_NODE=8     # spawns 8 workers here
    torchrun --nproc-per-node 8 -m fastssl.train ...             # each worker joins
    srun --ntasks-per-node 8 fastssl-train ...                   # each SLURM task joins

``plan_launch`` decides from the config and the environment; ``run_workers`` starts the local
workers as subprocesses (``python -m fastssl.train`` with the same arguments and torchrun's
variables), watches them, and ends the job when one fails: the others are killed at once (they
would otherwise wait in a collective until its timeout), the failing rank's error is printed
once, and the launcher exits with its status. SIGTERM, SIGUSR1 and Ctrl-C are forwarded to the
workers as SIGTERM: rank 0 checkpoints at the next agreed step boundary and all exit cleanly.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_ERROR_FILE = "FASTSSL_ERROR_FILE"    # where a spawned worker writes its error for the launcher
_LAUNCHER_PID = "FASTSSL_LAUNCHER_PID"


@dataclass
class LaunchPlan:
    """spawn > 0: start that many local workers here. spawn == 0: run in this process, after
    exporting ``worker_env`` (a SLURM task's place, in torchrun's variables)."""

    spawn: int = 0
    node_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    worker_env: dict = field(default_factory=dict)
    notice: str | None = None


def free_port() -> int:
    """A TCP port on this machine that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: "gpu[01-03,07],cpu1" -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]+)(?:\[([^\]]+)\])?([^,\[\]]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            start, _, end = part.partition("-")
            for number in range(int(start), int(end or start) + 1):
                hosts.append(f"{prefix}{number:0{len(start)}d}{suffix}")
    return hosts


def _parse_run_id(run_id: str) -> tuple[str, int] | None:
    if run_id == "auto":
        return None
    host, _, port = run_id.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"config.DISTRIBUTED.RUN_ID must be auto or host:port, got {run_id!r}")
    return host, int(port)


def plan_launch(*, num_nodes: int, num_proc_per_node: int, run_id: str, environ: dict,
                gpus_visible: int | None) -> LaunchPlan:
    """How this process takes part in the run.

    1. torchrun, or a worker this module spawned (RANK and WORLD_SIZE set): join as is.
    2. An srun step of several tasks: one task per process joins (SLURM_PROCID, SLURM_LOCALID);
       one task per node spawns NUM_PROC_PER_NODE workers (node rank SLURM_NODEID).
    3. No launcher: NUM_PROC_PER_NODE > 1 spawns that many workers on this machine. NUM_NODES > 1
       cannot be honoured here (nothing says which node this is, and VISSL would wait forever for
       the others), so the run uses this node's processes and says so.
    gpus_visible: CUDA devices for a GPU run (None on the CPU), checked before spawning.
    """
    configured = num_nodes * num_proc_per_node
    explicit = _parse_run_id(run_id)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        notice = None
        if world != configured and environ["RANK"] == "0":
            notice = (f"the launcher started {world} processes while DISTRIBUTED says {num_nodes} x "
                      f"{num_proc_per_node}: the global batch follows the {world} processes")
        env = {}
        if "MASTER_ADDR" not in environ and explicit:
            env = {"MASTER_ADDR": explicit[0], "MASTER_PORT": str(explicit[1])}
        return LaunchPlan(world_size=world, worker_env=env, notice=notice)

    num_tasks = int(environ.get("SLURM_NTASKS", 1))
    if "SLURM_STEP_ID" in environ and num_tasks > 1:
        return _plan_slurm(environ, num_nodes=num_nodes, num_proc_per_node=num_proc_per_node, explicit=explicit)

    notice = None
    if num_nodes > 1:
        what = "training on one process" if num_proc_per_node == 1 else \
            f"starting the {num_proc_per_node} processes of this node only"
        notice = (f"DISTRIBUTED asks for {num_nodes} nodes x {num_proc_per_node} processes, but no torchrun or "
                  f"srun environment tells this machine its place: {what} (several nodes: see README; "
                  f"set DISTRIBUTED.NUM_NODES=1 to silence this)")
    if num_proc_per_node == 1:
        return LaunchPlan(notice=notice)
    if gpus_visible is not None and gpus_visible < num_proc_per_node:
        raise ValueError(f"config.DISTRIBUTED.NUM_PROC_PER_NODE={num_proc_per_node} but {gpus_visible} GPU(s) are "
                         f"visible: set it to at most {gpus_visible}")
    host, port = explicit or ("127.0.0.1", free_port())
    return LaunchPlan(spawn=num_proc_per_node, world_size=num_proc_per_node, master_addr=host, master_port=port,
                      notice=notice)


def _plan_slurm(environ: dict, *, num_nodes: int, num_proc_per_node: int, explicit) -> LaunchPlan:
    num_tasks = int(environ["SLURM_NTASKS"])
    slurm_nodes = int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", 1)))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ["SLURM_NODELIST"]
    host, port = explicit or (environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
                              int(environ.get("MASTER_PORT") or 10000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000))
    if num_tasks == num_nodes * num_proc_per_node:
        env = {"RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
               "WORLD_SIZE": str(num_tasks), "LOCAL_WORLD_SIZE": str(num_tasks // slurm_nodes),
               "MASTER_ADDR": host, "MASTER_PORT": str(port)}
        return LaunchPlan(world_size=num_tasks, master_addr=host, master_port=port, worker_env=env)
    if num_tasks == slurm_nodes == num_nodes:
        return LaunchPlan(spawn=num_proc_per_node, node_rank=int(environ["SLURM_NODEID"]),
                          world_size=num_nodes * num_proc_per_node, master_addr=host, master_port=port)
    raise ValueError(f"this srun step has {num_tasks} tasks on {slurm_nodes} nodes, but DISTRIBUTED says "
                     f"NUM_NODES={num_nodes} x NUM_PROC_PER_NODE={num_proc_per_node}: run one task per process "
                     f"(--ntasks-per-node={num_proc_per_node}) or one per node, with NUM_NODES={slurm_nodes}")


# ---------------------------------------------------------------------------------------------
# The launcher side
# ---------------------------------------------------------------------------------------------

def _describe(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    name = signal.Signals(-code).name
    hint = " (killed from outside; often the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
    return f"was killed by {name}{hint}"


def _kill_tree(process) -> None:
    """SIGKILL a worker and its DataLoader workers (its own session, so one process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def run_workers(*, command: list[str], num_workers: int, node_rank: int, world_size: int, master_addr: str,
                master_port: int, poll_s: float = 0.05) -> int:
    """Start ``num_workers`` copies of ``command`` with torchrun's variables, wait, return the job's status.

    Worker i of this node is rank node_rank * num_workers + i. When one fails, the others are
    killed within ``poll_s`` and the root cause is reported once: a worker killed by a signal we
    did not send, else the earliest error a worker recorded (the others' later errors are echoes).
    Returns 0, the failing worker's status, or 128 + the signal that killed it (130 after a
    second Ctrl-C, which kills the workers instead of waiting for their checkpoint).
    """
    error_dir = Path(tempfile.mkdtemp(prefix="fastssl-launch-"))
    # The workers never import from the directory the user runs in (a yaml.py planted there would run in every
    # rank): PYTHONSAFEPATH keeps it off sys.path, and an empty PYTHONPATH entry, which means that directory, is
    # dropped.
    python_path = os.pathsep.join(p for p in (str(_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p)
    # torchrun's rule: without it each worker would start a thread per core and they would fight.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // num_workers))
    processes = []
    for local_rank in range(num_workers):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "RANK": str(node_rank * num_workers + local_rank),
               "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(num_workers),
               "GROUP_RANK": str(node_rank),
               "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "PYTHONPATH": python_path,
               "PYTHONSAFEPATH": "1",
               _ERROR_FILE: str(error_dir / f"rank{local_rank}.json"), _LAUNCHER_PID: str(os.getpid())}
        processes.append(subprocess.Popen(command, env=env, start_new_session=True))

    interrupts, killed = [], set()

    def forward(signum, frame):
        interrupts.append(signum)
        hard = interrupts.count(signal.SIGINT) > 1
        if signum == signal.SIGINT and not hard:
            print("fastssl-train: stopping at the next step boundary with a checkpoint (Ctrl-C again to kill)",
                  file=sys.stderr, flush=True)
        for process in processes:
            if process.poll() is not None:
                continue
            if hard:
                killed.add(process.pid)
                _kill_tree(process)
            else:
                process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while any(process.poll() is None for process in processes):
            if any(process.poll() not in (None, 0) for process in processes):
                for process in processes:  # the dead ones too: their DataLoader workers may linger
                    if process.poll() is None:
                        killed.add(process.pid)
                    _kill_tree(process)
                break
            time.sleep(poll_s)
        for process in processes:
            process.wait()
    finally:
        for process in processes:
            if process.poll() is None:
                _kill_tree(process)
                process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    status = _report(processes, killed=killed, error_dir=error_dir, node_rank=node_rank, num_workers=num_workers)
    if status == 0 and interrupts.count(signal.SIGINT) > 1:
        print("fastssl-train: interrupted; the last checkpoint is intact", file=sys.stderr, flush=True)
        status = 130
    for path in error_dir.iterdir():
        path.unlink()
    error_dir.rmdir()
    return status


def _report(processes, *, killed: set, error_dir: Path, node_rank: int, num_workers: int) -> int:
    failed = [(i, p) for i, p in enumerate(processes) if p.returncode != 0 and p.pid not in killed]
    if not failed:
        return 0
    errors = {}
    for i, _ in failed:
        path = error_dir / f"rank{i}.json"
        if path.exists():
            errors[i] = json.loads(path.read_text())
    by_signal = [(i, p) for i, p in failed if p.returncode < 0]
    if by_signal:
        local, process = by_signal[0]
    elif errors:
        local = min(errors, key=lambda i: errors[i]["time"])
        process = processes[local]
    else:
        local, process = failed[0]
    rank = node_rank * num_workers + local
    others = f"; the other {len(killed)} worker(s) were stopped" if killed else ""
    print(f"fastssl-train: rank {rank} (pid {process.pid}) {_describe(process.returncode)}{others}",
          file=sys.stderr, flush=True)
    if local in errors and process.returncode >= 0:
        print(errors[local]["message"].rstrip(), file=sys.stderr, flush=True)
    return process.returncode if process.returncode > 0 else 128 - process.returncode


# ---------------------------------------------------------------------------------------------
# The worker side
# ---------------------------------------------------------------------------------------------

def spawned_by_launcher() -> bool:
    """True in a worker that run_workers started: its parent is the launcher that the environment names, and
    it leads its own session (start_new_session), and its error file lies in the launcher's fastssl-launch-*
    folder, which exists while the launcher runs. A FASTSSL_LAUNCHER_PID or FASTSSL_ERROR_FILE left in the
    environment of any other process (a shell that exported it) is never acted on."""
    launcher, error_file = os.environ.get(_LAUNCHER_PID, ""), os.environ.get(_ERROR_FILE, "")
    return (launcher.isdigit() and os.getppid() == int(launcher) and os.getsid(0) == os.getpid()
            and bool(error_file) and Path(error_file).parent.name.startswith("fastssl-launch-")
            and Path(error_file).parent.is_dir())


def record_error(message: str) -> bool:
    """In a spawned worker, hand ``message`` to the launcher (which prints the root cause once) and
    return True; elsewhere return False, and the caller prints it."""
    if not spawned_by_launcher():
        return False
    path = os.environ[_ERROR_FILE]
    Path(path).write_text(json.dumps({"time": time.time(), "rank": os.environ.get("RANK"), "message": message}))
    return True


def exit_with_launcher() -> None:
    """In a spawned worker, kill this worker's process group if the launcher disappears (kill -9),
    so that no worker outlives its job. A daemon thread checks the parent once a second."""
    if not spawned_by_launcher():
        return
    launcher = os.environ[_LAUNCHER_PID]

    def watch():
        while os.getppid() == int(launcher):
            time.sleep(1.0)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="fastssl-launcher-watch", daemon=True).start()
