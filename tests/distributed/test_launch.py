"""fastssl.launch: the launch plan (spawn, join, SLURM), and the launcher's failure handling with
light workers (plain Python, no torch): a rank that raises or is killed ends the job at once with
its status and its error printed once; SIGTERM is forwarded; no worker outlives its launcher."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fastssl import launch
from fastssl.launch import expand_nodelist, plan_launch, run_workers

ROOT = Path(__file__).resolve().parents[2]


def test_expand_nodelist():
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("gpu[01-03,10],cpu-a1") == ["gpu01", "gpu02", "gpu03", "gpu10", "cpu-a1"]
    assert expand_nodelist("n[8-9]-ib,m[099-100]") == ["n8-ib", "n9-ib", "m099", "m100"]


def test_plan_single_process_needs_no_launcher():
    plan = plan_launch(num_nodes=1, num_proc_per_node=1, run_id="auto", environ={}, gpus_visible=None)
    assert plan.spawn == 0 and plan.world_size == 1 and plan.notice is None


def test_plan_eight_node_seed_with_one_process_per_node_runs_one_process_with_a_notice():
    plan = plan_launch(num_nodes=8, num_proc_per_node=1, run_id="auto", environ={}, gpus_visible=1)
    assert plan.spawn == 0 and "training on one process" in plan.notice


def test_plan_spawns_local_workers_and_checks_gpus():
    plan = plan_launch(num_nodes=1, num_proc_per_node=4, run_id="auto", environ={}, gpus_visible=None)
    assert plan.spawn == 4 and plan.world_size == 4 and plan.master_addr == "127.0.0.1" and plan.master_port > 0
    plan = plan_launch(num_nodes=2, num_proc_per_node=2, run_id="head:29400", environ={}, gpus_visible=2)
    assert (plan.spawn, plan.master_addr, plan.master_port) == (2, "head", 29400)
    assert "this node only" in plan.notice
    with pytest.raises(ValueError, match="1 GPU"):
        plan_launch(num_nodes=1, num_proc_per_node=8, run_id="auto", environ={}, gpus_visible=1)
    with pytest.raises(ValueError, match="RUN_ID"):
        plan_launch(num_nodes=1, num_proc_per_node=2, run_id="nohostport", environ={}, gpus_visible=None)


def test_plan_joins_under_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    plan = plan_launch(num_nodes=2, num_proc_per_node=8, run_id="auto", environ=env, gpus_visible=8)
    assert plan.spawn == 0 and plan.worker_env == {} and plan.notice is None


SLURM = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[07-08]",
         "SLURM_NODEID": "1"}


def test_plan_slurm_one_task_per_gpu_joins_with_torchrun_variables():
    env = {**SLURM, "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    plan = plan_launch(num_nodes=2, num_proc_per_node=8, run_id="auto", environ=env, gpus_visible=8)
    assert plan.spawn == 0
    assert plan.worker_env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 4242)}


def test_plan_slurm_one_task_per_node_spawns_this_nodes_workers():
    env = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    plan = plan_launch(num_nodes=2, num_proc_per_node=8, run_id="gpu07:29500", environ=env, gpus_visible=8)
    assert (plan.spawn, plan.node_rank, plan.world_size, plan.master_addr, plan.master_port) == \
        (8, 1, 16, "gpu07", 29500)
    with pytest.raises(ValueError, match="NUM_NODES=2"):
        plan_launch(num_nodes=4, num_proc_per_node=8, run_id="auto", environ=env, gpus_visible=8)


# ---------------------------------------------------------------------------------------------
# The launcher with light workers
# ---------------------------------------------------------------------------------------------

def _worker(body: str) -> list[str]:
    prelude = "import os, signal, sys, time\nfrom fastssl import launch\nrank = int(os.environ['RANK'])\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(body)]


def _launch(body: str, num_workers: int = 2) -> tuple[int, float]:
    start = time.monotonic()
    status = run_workers(command=_worker(body), num_workers=num_workers, node_rank=0, world_size=num_workers,
                         master_addr="127.0.0.1", master_port=1)
    return status, time.monotonic() - start


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_rank_that_raises_ends_the_job_with_its_error_printed_once(tmp_path, capfd):
    status, elapsed = _launch(f"""
        open("{tmp_path}/pid%d" % rank, "w").write(str(os.getpid()))
        if rank == 1:
            time.sleep(0.3)
            launch.record_error("Traceback: ValueError: rank one broke")
            sys.exit(1)
        time.sleep(60)  # rank 0 waits in a collective that will never complete
        """)
    assert status == 1 and elapsed < 10
    err = capfd.readouterr().err
    assert "rank 1" in err and "exited with status 1" in err and err.count("rank one broke") == 1
    assert not _alive(int((tmp_path / "pid0").read_text()))


def test_a_rank_killed_by_a_signal_is_the_root_cause(tmp_path, capfd):
    status, elapsed = _launch(f"""
        if rank == 0:
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        time.sleep(0.6)
        launch.record_error("RuntimeError: connection closed by peer")  # an echo of rank 0's death
        sys.exit(1)
        """)
    assert status == 128 + signal.SIGKILL and elapsed < 10
    err = capfd.readouterr().err
    assert "rank 0" in err and "SIGKILL" in err and "connection closed" not in err


def test_sigterm_is_forwarded_and_workers_exit_cleanly(tmp_path):
    body = f"""
        signal.signal(signal.SIGTERM, lambda *a: open("{tmp_path}/stopped%d" % rank, "w").close())
        open("{tmp_path}/ready%d" % rank, "w").close()
        while not os.path.exists("{tmp_path}/stopped%d" % rank):
            time.sleep(0.02)
        """

    def signal_when_ready():
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM preempting the launcher

    threading.Thread(target=signal_when_ready, daemon=True).start()
    status, _ = _launch(body)
    assert status == 0 and all((tmp_path / f"stopped{r}").exists() for r in range(2))


def test_a_second_ctrl_c_kills_workers_stuck_in_a_collective(tmp_path):
    body = f"""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck in C code: the stop request never lands
        open("{tmp_path}/ready%d" % rank, "w").close()
        time.sleep(60)
        """

    def interrupt_twice():
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            time.sleep(0.02)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    status, elapsed = _launch(body)
    assert status == 130 and elapsed < 10


def test_workers_do_not_outlive_a_killed_launcher(tmp_path):
    worker = _worker(f"""
        launch.exit_with_launcher()
        open("{tmp_path}/pid%d" % rank, "w").write(str(os.getpid()))
        time.sleep(60)
        """)
    launcher = subprocess.Popen([sys.executable, "-c", (
        "from fastssl.launch import run_workers\n"
        f"run_workers(command={worker!r}, num_workers=2, node_rank=0, world_size=2, master_addr='x', master_port=1)")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"pid{r}").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_a_stray_launcher_pid_or_error_file_in_the_environment_is_never_acted_on(tmp_path, monkeypatch):
    """Only a worker that run_workers started (its child, leading its own session) watches the launcher and
    writes the error file: an exported FASTSSL_LAUNCHER_PID would otherwise kill the caller's process group."""
    error_file = tmp_path / "users_file"
    error_file.write_text("mine")
    monkeypatch.setenv("FASTSSL_LAUNCHER_PID", str(os.getppid()))
    monkeypatch.setenv("FASTSSL_ERROR_FILE", str(error_file))
    launch.exit_with_launcher()
    assert "fastssl-launcher-watch" not in [thread.name for thread in threading.enumerate()]
    assert launch.record_error("an error") is False and error_file.read_text() == "mine"


def test_spawned_workers_never_import_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep + os.environ.get("PYTHONPATH", ""))  # an empty entry: the cwd
    status = run_workers(command=[sys.executable, "-c", "import importlib.util, sys; "
                                  "sys.exit(importlib.util.find_spec('planted') is not None)"],
                         num_workers=2, node_rank=0, world_size=2, master_addr="127.0.0.1", master_port=1)
    assert status == 0 and not (tmp_path / "ran").exists()
