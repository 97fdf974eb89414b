"""fastssl-bench attacks: crafted input against the real commands (issue 23). Each scenario runs fastssl-train,
fastssl-eval or fastssl-export as a user would, in a folder of its own, under a timeout and a memory cap
(RLIMIT_AS, set in the child before it starts), and judges what fastssl promises: bad input is refused with one
error line (or a counted skip), nothing is corrupted, nothing of the user's is deleted or overwritten, no code is
run from the working directory, and the peak memory (the child's maximum resident set, from wait4) stays bounded.

    fastssl-bench attacks [--only planted_module,export_overwrite,...] [--workdir DIR] [--timeout 300]
                          [--memory-mb 12000]

A scenario is ``scenario(workdir: Path) -> dict`` with "name", "outcome" ("refused", "skipped", "ok" or "FAILED"),
"detail" (one line) and "peak_rss_mb". The .beton and bounded-memory scenarios live in benchmarks/attacks_data.py
(its SCENARIOS list), run here too when that module exists. Prints a table and one JSON line; exits 1 when a
scenario FAILED.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.fault_harness import TINY, TWO_RANKS

BIN = Path(sys.executable).parent  # the console scripts of this environment
LIMITS = {"timeout_s": 300.0, "memory_mb": 12000}  # per command; main's --timeout and --memory-mb set them
CONFIG = "config=pretrain/swav/swav_1node_cpu_resnet18"
# The fault harness's tiny recipe without its config word, cut to 2 steps of 8 images.
QUICK = [*(word for word in TINY if not word.startswith("config=")), "config.OPTIMIZER.num_epochs=1",
         "config.DATA.TRAIN.DATA_LIMIT=16"]


@dataclass
class Ran:
    status: int          # the exit status; 128 + signal when killed; 124 after the timeout
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float   # the largest peak resident set (VmHWM) of the command's processes, polled


_OWN_COMMAND_LINE = Path("/proc/self/cmdline").read_bytes()


def _session_peak_mb(session: int) -> float:
    """The largest VmHWM among the live processes of a session (the command, its workers, their loaders)."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            if (entry / "cmdline").read_bytes() == _OWN_COMMAND_LINE:  # forked, not yet exec'd: the harness's pages
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            continue
    return peak / 1024


def run(argv: list[str], *, cwd: Path, env: dict | None = None) -> Ran:
    """Run a command in ``cwd`` in a session of its own, with a timeout and an address-space cap (RLIMIT_AS, set in
    the child); FASTSSL_CACHE is the harness's shared cache (the built-in dataset is generated once). Peak memory
    is polled from /proc every 0.1 s (wait4's ru_maxrss would count the harness's own pages, forked before exec)."""
    memory = LIMITS["memory_mb"] * 2**20

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTSSL_CACHE": str(cwd.parent / "cache"), **(env or {})}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, env=environment, start_new_session=True,
                               preexec_fn=cap)
    peak = 0.0
    while process.poll() is None and time.monotonic() - started < LIMITS["timeout_s"]:
        peak = max(peak, _session_peak_mb(process.pid))
        time.sleep(0.1)
    status = process.poll()
    if status is None:
        status = 124
    elif status < 0:
        status = 128 - status
    try:
        os.killpg(process.pid, signal.SIGKILL)  # after a timeout, or whatever the command left behind
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
    texts = []
    for stream in (out, err):
        stream.seek(0)
        texts.append(stream.read())
        stream.close()
    return Ran(status, texts[0], texts[1], time.monotonic() - started, peak)


def refusal(ran: Ran, *, text: str = "") -> str:
    """The one error line of a command that refused (status 2, one line holding "error:", no traceback, ``text``
    in it), else ''."""
    errors = [line for line in ran.stderr.splitlines() if "error:" in line]
    if ran.status == 2 and len(errors) == 1 and "Traceback" not in ran.stderr and text in errors[0]:
        return errors[0]
    return ""


def result(name: str, outcome: str, detail: str, *runs: Ran) -> dict:
    detail = " ".join(detail.split())
    return {"name": name, "outcome": outcome, "detail": detail[:300],
            "peak_rss_mb": round(max((r.peak_rss_mb for r in runs), default=0.0), 1)}


def refused_or_failed(name: str, ran: Ran, *, text: str = "", intact: bool = True, why: str = "") -> dict:
    line = refusal(ran, text=text)
    if line and intact:
        return result(name, "refused", line, ran)
    tail = (ran.stderr.strip().splitlines() or ["(no output)"])[-1]
    problem = why if not intact else f"status {ran.status} after {ran.seconds:.0f} s, last line: {tail}"
    return result(name, "FAILED", problem, ran)


def train(*words: str) -> list[str]:
    return [str(BIN / "fastssl-train"), CONFIG, *QUICK, *words]


# ---------------- code from the working directory -----------------------------------------------------------

def planted_module(workdir: Path) -> dict:
    """A yaml.py in the folder a 2-process run starts from: the launcher and both ranks import the real one."""
    (workdir / "yaml.py").write_text(f"open({str(workdir / 'PLANTED_RAN')!r}, 'a').write('ran\\n')\n"
                                     "raise SystemExit('the planted yaml.py ran')\n")
    ran = run(train(*TWO_RANKS, f"config.CHECKPOINT.DIR={workdir / 'run'}"), cwd=workdir)
    if (workdir / "PLANTED_RAN").exists() or ran.status != 0:
        return result("planted_module", "FAILED", f"status {ran.status}; planted module ran: "
                      f"{(workdir / 'PLANTED_RAN').exists()}", ran)
    return result("planted_module", "ok", "a yaml.py in the working directory of a 2-rank run was not imported; "
                  "the run finished", ran)


def stray_launcher_variables(workdir: Path) -> dict:
    """FASTSSL_LAUNCHER_PID and FASTSSL_ERROR_FILE exported in the caller's environment: a run and a refused
    command behave as without them (old: the run killed its own process group; the error went into the file)."""
    users = workdir / "users_notes.txt"
    users.write_text("mine\n")
    env = {"FASTSSL_LAUNCHER_PID": "1", "FASTSSL_ERROR_FILE": str(users)}
    trained = run(train(f"config.CHECKPOINT.DIR={workdir / 'run'}"), cwd=workdir, env=env)
    misspelt = run(train("config.OPTIMIZER.num_epoch=1"), cwd=workdir, env=env)
    intact = users.read_text() == "mine\n"
    if trained.status != 0 or not refusal(misspelt, text="unknown config key") or not intact:
        return result("stray_launcher_variables", "FAILED", f"run status {trained.status}, misspelt key status "
                      f"{misspelt.status}, user's file intact: {intact}", trained, misspelt)
    return result("stray_launcher_variables", "ok", "a run with the stray variables finished; a misspelt key was one "
                  "line on stderr; the file they named is intact", trained, misspelt)


# ---------------- nothing of the user's deleted or overwritten ------------------------------------------------

def synthetic_root_user_files(workdir: Path) -> dict:
    """SYNTHETIC.ROOT with the user's files in it, then other dataset settings (old: the folder deleted)."""
    root = workdir / "data"
    first = run(train(f"config.DATA.TRAIN.SYNTHETIC.ROOT={root}", f"config.CHECKPOINT.DIR={workdir / 'a'}"),
                cwd=workdir)
    (root / "thesis.tex").write_text("precious")
    second = run(train(f"config.DATA.TRAIN.SYNTHETIC.ROOT={root}", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=3",
                       f"config.CHECKPOINT.DIR={workdir / 'b'}"), cwd=workdir)
    kept = (root / "thesis.tex").exists() and (root / "thesis.tex").read_text() == "precious"
    if first.status or second.status or not kept:
        return result("synthetic_root_user_files", "FAILED", f"statuses {first.status}, {second.status}; user's "
                      f"file kept: {kept}", first, second)
    return result("synthetic_root_user_files", "ok", f"other settings generated {len(list(root.iterdir())) - 1} "
                  "keyed folders beside the user's file, which is intact", first, second)


def knn_crafted_config(workdir: Path) -> dict:
    """A checkpoint whose embedded config names the user's folder as SYNTHETIC.ROOT, with a value out of range."""
    users = workdir / "users_data"
    users.mkdir()
    (users / "thesis.tex").write_text("precious")
    config = {"DATA": {"TRAIN": {"SYNTHETIC": {"ROOT": str(users), "IMAGE_SIZE": 16}}},
              "LOSS": {"swav_loss": {"temperature": float("inf")}}}
    torch.save({"model": {}, "head_params": [], "step": 1, "config": config}, workdir / "crafted.torch")
    ran = run([str(BIN / "fastssl-eval"), "knn", "--checkpoint", str(workdir / "crafted.torch"), "--cpu"], cwd=workdir)
    intact = [p.name for p in users.iterdir()] == ["thesis.tex"]
    return refused_or_failed("knn_crafted_config", ran, text="out of range", intact=intact,
                             why="the user's folder changed")


def export_overwrite(workdir: Path) -> dict:
    """fastssl-export onto an existing file, and onto its own input (old: both overwritten without a word)."""
    run_dir = workdir / "run"
    trained = run(train(f"config.CHECKPOINT.DIR={run_dir}"), cwd=workdir)
    checkpoint = next(run_dir.glob("checkpoint_step*.torch"), None)
    if trained.status or checkpoint is None:
        return result("export_overwrite", "FAILED", f"the training run failed with status {trained.status}", trained)
    users = workdir / "resnet.torch"
    users.write_bytes(b"the user's own file")
    before = checkpoint.read_bytes()
    existing = run([str(BIN / "fastssl-export"), str(run_dir), str(users)], cwd=workdir)
    onto_input = run([str(BIN / "fastssl-export"), str(run_dir), str(checkpoint), "--force"], cwd=workdir)
    intact = users.read_bytes() == b"the user's own file" and checkpoint.read_bytes() == before
    if refusal(existing, text="pass --force") and refusal(onto_input, text="is the input") and intact:
        return result("export_overwrite", "refused", f"{refusal(existing)} / {refusal(onto_input)}", trained,
                      existing, onto_input)
    return result("export_overwrite", "FAILED", f"statuses {existing.status}, {onto_input.status}; files intact: "
                  f"{intact}", trained, existing, onto_input)


def metrics_symlink(workdir: Path) -> dict:
    """A link planted as metrics.jsonl in the checkpoint folder (old: training appended to its target)."""
    users = workdir / "users_notes.txt"
    users.write_text("mine\n")
    (workdir / "run").mkdir()
    (workdir / "run" / "metrics.jsonl").symlink_to(users)
    ran = run(train(f"config.CHECKPOINT.DIR={workdir / 'run'}"), cwd=workdir)
    return refused_or_failed("metrics_symlink", ran, text="symbolic link", intact=users.read_text() == "mine\n",
                             why="the link's target was written")


def checkpoint_dir_root(workdir: Path) -> dict:
    """CHECKPOINT.DIR = the home directory (old: filled with checkpoints, as / was), a file, and a path too long:
    each refused before any data. HOME is a folder of the scenario's, so a build without the check writes there,
    not in the user's home (tests/fastssl/test_train_cli.py checks / itself without training)."""
    (workdir / "a_file").write_text("mine")
    (workdir / "home").mkdir()
    runs = [run(train(f"config.CHECKPOINT.DIR={directory}"), cwd=workdir, env={"HOME": str(workdir / "home")})
            for directory in (workdir / "home", workdir / "a_file", workdir / ("x" * 300))]
    lines = [refusal(r, text="CHECKPOINT.DIR") for r in runs]
    if all(lines) and (workdir / "a_file").read_text() == "mine":
        return result("checkpoint_dir_root", "refused", " / ".join(line.split("error: ")[-1][:70] for line in lines),
                      *runs)
    return result("checkpoint_dir_root", "FAILED", f"statuses {[r.status for r in runs]}", *runs)


# ---------------- no hang, one line ----------------------------------------------------------------------------

def worker_error(workdir: Path) -> dict:
    """A folder of 0-byte images read by 2 DataLoader workers (old: the error printed, then a hang at exit)."""
    for name in ("a", "b"):
        (workdir / "images" / name).mkdir(parents=True)
        for i in range(8):
            (workdir / "images" / name / f"{i}.jpg").touch()
    ran = run(train("config.DATA.NUM_DATALOADER_WORKERS=2", "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
                    f"config.DATA.TRAIN.DATA_PATHS=[{workdir / 'images'}]", f"config.CHECKPOINT.DIR={workdir / 'run'}"),
              cwd=workdir)
    return refused_or_failed("worker_error", ran, text="could be decoded")


def knn_unreadable_checkpoint(workdir: Path) -> dict:
    (workdir / "checkpoint_step00000001.torch").write_bytes(np.random.default_rng(0).bytes(4096))
    ran = run([str(BIN / "fastssl-eval"), "knn", "--checkpoint", str(workdir), "--cpu"], cwd=workdir)
    return refused_or_failed("knn_unreadable_checkpoint", ran, text="cannot read checkpoint")


def knn_zero_arguments(workdir: Path) -> dict:
    runs = [run([str(BIN / "fastssl-eval"), "knn", "--checkpoint", str(workdir), option, value], cwd=workdir)
            for option, value in (("--k", "0"), ("--temperature", "0"), ("--batch-size", "0"))]
    lines = [refusal(r, text="must be") for r in runs]
    if all(lines):
        return result("knn_zero_arguments", "refused", " / ".join(line.split("error: ")[-1] for line in lines), *runs)
    return result("knn_zero_arguments", "FAILED", f"statuses {[r.status for r in runs]}", *runs)


def labels_header(workdir: Path) -> dict:
    """A ClusterFit labels .npy whose header claims 10^10 labels (old: an 80 GB allocation, a traceback)."""
    np.save(workdir / "labels.npy", np.zeros(16, dtype=np.int64))
    data = (workdir / "labels.npy").read_bytes()
    (workdir / "labels.npy").write_bytes(data.replace(b"(16,), }" + b" " * 9, b"(10000000000,), }", 1))  # same length
    ran = run([str(BIN / "fastssl-train"), "config=pretrain/clusterfit/clusterfit_1node_cpu_resnet18", *QUICK,
               f"config.DATA.TRAIN.LABEL_PATHS=[{workdir / 'labels.npy'}]", f"config.CHECKPOINT.DIR={workdir / 'run'}"],
              cwd=workdir)
    return refused_or_failed("labels_header", ran, text="labels file")


CONFIG_ATTACKS = {  # one config value each, refused by fastssl-train --cfg job before anything is built
    "infinite_temperature": ("config.LOSS.swav_loss.temperature=.inf", "out of range"),
    "infinite_epsilon": ("config.LOSS.swav_loss.epsilon=.inf", "out of range"),
    "negative_lr": ("config.OPTIMIZER.param_schedulers.lr.start_value=-0.1", "out of range"),
    "interpolation": ("config.CHECKPOINT.DIR=${oc.env:HOME}", "interpolations"),
    "nested_value": ("config.DATA.TRAIN.DATA_PATHS=" + "[" * 5000 + "]" * 5000, "nested more than"),
    "huge_value": ("config.LOSS.swav_loss.temperature=" + "x" * 1_000_000, "characters)"),
}


def config_values(workdir: Path) -> dict:
    """Values that were accepted silently or answered with a traceback or a 1 MB echo."""
    runs, failed = [], []
    for name, (word, text) in CONFIG_ATTACKS.items():
        argv = [str(BIN / "fastssl-train"), CONFIG, "--cfg", "job", word]
        if len(word) > 100_000:  # longer than an exec argument may be (MAX_ARG_STRLEN): fastssl-train's main in Python
            (workdir / "word").write_text(word)
            argv = [sys.executable, "-c", "import sys; from fastssl.train import main; "
                    f"sys.exit(main([{CONFIG!r}, '--cfg', 'job', open({str(workdir / 'word')!r}).read()]))"]
        runs.append(run(argv, cwd=workdir))
        line = refusal(runs[-1], text=text)
        if not line or len(line) > 400:
            failed.append(name)
    if failed:
        return result("config_values", "FAILED", f"not refused in one short line: {', '.join(failed)}", *runs)
    return result("config_values", "refused", f"{len(runs)} values ({', '.join(CONFIG_ATTACKS)}) each refused in "
                  "one line", *runs)


SCENARIOS = [planted_module, stray_launcher_variables, synthetic_root_user_files, knn_crafted_config,
             export_overwrite, metrics_symlink, checkpoint_dir_root, worker_error, knn_unreadable_checkpoint,
             knn_zero_arguments, labels_header, config_values]


def all_scenarios() -> list:
    """This module's scenarios, then benchmarks/attacks_data.py's (the .beton and bounded-memory ones) if present."""
    try:
        from benchmarks.attacks_data import SCENARIOS as data_scenarios
    except ImportError:
        data_scenarios = []
    return [*SCENARIOS, *data_scenarios]


def run_scenario(scenario, root: Path) -> dict:
    """One scenario in a fresh folder under ``root``; an exception in the harness itself is a FAILED row."""
    workdir = root / scenario.__name__
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    began = time.monotonic()
    try:
        row = scenario(workdir)
    except Exception as error:  # noqa: BLE001 - a broken scenario is reported, the others still run
        row = result(scenario.__name__, "FAILED", f"the harness raised {type(error).__name__}: {error}")
    row["seconds"] = round(time.monotonic() - began, 1)
    return row


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-bench attacks", description=__doc__.split("\n\n")[0])
    scenarios = all_scenarios()
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--workdir", default=None, help="kept when given (default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=LIMITS["timeout_s"], help="seconds per command")
    parser.add_argument("--memory-mb", type=int, default=LIMITS["memory_mb"], help="address-space cap per command")
    args = parser.parse_args(argv)
    LIMITS.update(timeout_s=args.timeout, memory_mb=args.memory_mb)
    names = [name for name in args.only.split(",") if name]
    unknown = [name for name in names if name not in {s.__name__ for s in scenarios}]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; one of {', '.join(s.__name__ for s in scenarios)}")
    chosen = [s for s in scenarios if not names or s.__name__ in names]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fastssl-attacks-"))
    rows, started = [], time.monotonic()
    try:
        for scenario in chosen:
            rows.append(run_scenario(scenario, root))
            print(f"{rows[-1]['name']}: {rows[-1]['outcome']}", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'scenario':<28} {'outcome':<8} {'peak MB':>8} {'s':>6}  detail")
    for row in rows:
        print(f"{row['name']:<28} {row['outcome']:<8} {row['peak_rss_mb']:>8.0f} {row['seconds']:>6.1f}  "
              f"{row['detail']}")
    print(json.dumps({"benchmark": "attacks", "machine": machine(), "commit": commit(),
                      "seconds": round(time.monotonic() - started, 1), "limits": LIMITS,
                      "command": "fastssl-bench attacks " + " ".join(argv if argv is not None else sys.argv[2:]),
                      "scenarios": rows}))
    return 1 if any(row["outcome"] == "FAILED" for row in rows) else 0
