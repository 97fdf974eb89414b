"""fastssl-train -m: sweeps through Hydra's sweeper and launcher plugins (basic, submitit_local, submitit_slurm).

    fastssl-train -m config=pretrain/swav/swav_1node_cpu_resnet18 config.LOSS.swav_loss.epsilon=0.03,0.05

The config words stay fastssl's (fastssl/config.py composes and validates each job). Only the swept
``config.KEY=a,b`` words go to Hydra, whose sweeper expands them and whose launcher runs one job per
combination: ``run_job`` trains with ``fastssl.train.main`` in SWEEP_DIR/<swept overrides> (Hydra's
output directory of the job, also its CHECKPOINT.DIR, so re-running the sweep resumes each job). A job
never raises: its exit status is recorded, so a failed job does not stop the others. At the end a table
and SWEEP_DIR/sweep.jsonl give each job's overrides, status, final loss, images/s and kNN top-1.

Under submitit a SIGUSR1 (SLURM's time limit, ``--signal USR1@signal_delay_s``) or SIGTERM first stops
fastssl at a step boundary with a checkpoint (dist.StopOnSignal); the job then hands the signal on to
submitit, which requeues it, and the requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import traceback
from pathlib import Path

from hydra import initialize
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from .run_data import launch_resources, planned_derived
from .checkpoint import latest_checkpoint
from .cli import Command
from .config import ConfigError, compose_config, join_words
from .metrics import notice, read_records

PRIMARY = "fastssl_sweep"          # Hydra's primary config, stored in its ConfigStore
SUMMARY_FILE = "sweep.jsonl"
JOB_FILE = "sweep_job.json"
MAX_CHECKED = 64                   # combinations composed and validated before anything is launched
# fastssl stops on SIGUSR1 (dist.StopOnSignal); submitit's default, USR2, would kill a job without its
# checkpoint. Set before submitit is imported (it reads the variable once) and inherited by its jobs.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")


def split_sweeps(words: list[str]) -> tuple[list[str], list[str]]:
    """(fixed words, swept words). A ``config.KEY`` word is swept when Hydra's grammar reads its value as a
    sweep (top-level commas, range(...), choice(...)); ``[0.14, 1]`` or a mapping is one value. Words
    Hydra cannot read (YAML mappings with quoted keys) are fixed values."""
    parser = OverridesParser.create()
    fixed, swept = [], []
    for word in words:
        try:
            override = parser.parse_overrides([word])[0]
        except HydraException:
            fixed.append(word)
            continue
        if not override.is_sweep_override():
            fixed.append(word)
        elif word.startswith("config."):
            swept.append(word)
        else:
            raise ConfigError(f"cannot sweep {word!r}: only config.KEY=value words are swept")
    return fixed, swept


def check_combinations(fixed: list[str], swept: list[str]):
    """Compose and validate the jobs before launching any (a misspelt key is the usual one-line error);
    returns the first job's config. Sweeps a sweeper samples (interval(...)) are checked at their first value."""
    parser = OverridesParser.create()
    choices = []
    for word in swept:
        override = parser.parse_overrides([word])[0]
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:
            values = []
        choices.append([f"{override.get_key_element()}={value}" for value in values])
    first = None
    for combination in itertools.islice(itertools.product(*[c for c in choices if c]), MAX_CHECKED):
        cfg = compose_config([*fixed, *combination])
        first = first if first is not None else cfg
    return first


def _nested(keys: list[str]) -> dict:
    """{"config": {"LOSS": {"swav_loss": {"epsilon": None}}}} for config.LOSS.swav_loss.epsilon: the keys
    Hydra overrides in its own config (the job reads its overrides, not that config)."""
    root: dict = {}
    for key in keys:
        node = root
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
    return root


def launcher_defaults(hydra_words: list[str], resources: dict) -> list[str]:
    """The submitit launchers' resources from DISTRIBUTED, unless the command line sets them. SLURM gets
    NUM_NODES nodes x NUM_PROC_PER_NODE tasks (one per GPU; launch.py reads SLURM's ranks); the local
    executor sets no SLURM variables, so there one task starts fastssl's own NUM_PROC_PER_NODE workers."""
    launcher = next((w.split("=", 1)[1] for w in hydra_words if w.split("=", 1)[0].lstrip("+") == "hydra/launcher"),
                    "basic")
    if launcher == "submitit_slurm":
        defaults = {"nodes": resources["nodes"], "tasks_per_node": resources["tasks_per_node"],
                    "max_num_timeout": 10}
        if resources["gpus_per_node"]:
            defaults["gpus_per_node"] = resources["gpus_per_node"]
    elif launcher == "submitit_local":
        defaults = {"nodes": 1, "tasks_per_node": 1}
    else:
        return []
    given = {w.split("=", 1)[0].lstrip("+") for w in hydra_words}
    return [f"hydra.launcher.{key}={value}" for key, value in defaults.items() if f"hydra.launcher.{key}" not in given]


def multirun(command: Command) -> int:
    """Run the sweep; return the number of failed jobs (0: all trained), at most 125."""
    fixed, swept = split_sweeps(join_words(command.overrides))
    resources = launch_resources(check_combinations(fixed, swept))
    given_dir = next((w.split("=", 1)[1] for w in command.hydra_overrides if w.startswith("hydra.sweep.dir=")), None)
    sweep_dir = Path(given_dir or (resources["checkpoint_dir"] + ("_sweep" if swept else ""))).resolve()
    swept_keys = [word.split("=", 1)[0] for word in swept]
    primary = {"fastssl": {"argv": fixed, "knn": command.knn},
               "hydra": {"job": {"chdir": False, "name": "fastssl"}, "sweep": {"dir": str(sweep_dir),
                                                            "subdir": "${hydra.job.override_dirname}"}},
               **_nested(swept_keys)}
    overrides = [*launcher_defaults(command.hydra_overrides, resources),
                 *[w for w in command.hydra_overrides if not w.startswith("hydra.sweep.dir=")], *swept]
    ConfigStore.instance().store(name=PRIMARY, node=primary)
    GlobalHydra.instance().clear()
    try:
        with initialize(version_base="1.3", config_path=None, job_name="fastssl"):
            returns = GlobalHydra.instance().hydra.multirun(config_name=PRIMARY, task_function=run_job,
                                                            overrides=overrides)
    except HydraException as error:  # a launcher or sweeper that is not installed, a bad hydra key
        hint = " (the submitit launchers: pip install 'fastssl[slurm]')" if "launcher" in str(error) else ""
        raise ConfigError(str(error).strip().splitlines()[0] + hint) from None
    finally:
        GlobalHydra.instance().clear()
    records = collect(returns, sweep_dir)
    print(summary_table(records))
    with open(sweep_dir / SUMMARY_FILE, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    failed = sum(record["status"] != 0 for record in records)
    print(f"fastssl: {len(records)} job(s), {failed} failed; summary in {sweep_dir / SUMMARY_FILE}", flush=True)
    return min(failed, 125)


# ---------------- one job (in this process, or in a submitit job) ----------------------------------

def run_job(job) -> dict:
    """Hydra's task function: train one combination in its output directory; return its record."""
    hydra = HydraConfig.get()
    job_dir = hydra.runtime.output_dir
    swept = list(hydra.overrides.task)
    argv = [*job.fastssl.argv, *swept, f"config.CHECKPOINT.DIR={job_dir}"]
    record = {"job": hydra.job.num, "overrides": swept, "dir": job_dir}
    try:
        from .train import main as train_main  # fastssl.train imports this module
        record["status"] = train_main(argv)
    except Exception:  # noqa: BLE001 - one failed job must not stop the sweep
        traceback.print_exc()
        record["status"] = 1
    if os.environ.get("RANK", "0") != "0":  # the other tasks of a SLURM job: rank 0 reports
        return record
    record.update(metrics_summary(job_dir))
    if record["status"] == 0 and os.environ.get("SUBMITIT_EXECUTOR"):
        requeue_if_stopped(argv, job_dir)
    if record["status"] == 0 and job.fastssl.knn:
        record["knn_top1"] = knn_top1(job_dir)
    Path(job_dir, JOB_FILE).write_text(json.dumps(record) + "\n")
    return record


def metrics_summary(job_dir: str) -> dict:
    """The last logged loss and step, and the mean images/s (the first record, with warm-up, left out)."""
    records, malformed = read_records(Path(job_dir) / "metrics.jsonl")
    steps = [record for record in records
             if all(isinstance(record.get(key), (int, float)) for key in ("loss", "images_per_s", "step"))]
    ends = sum(1 for record in records if record.get("phase") == "end")  # final metrics, not a step's
    skipped = malformed + len(records) - len(steps) - ends
    summary = {"final_loss": None, "images_per_s": None, "step": None, "skipped_lines": skipped}
    if skipped:
        notice(f"{job_dir}/metrics.jsonl: {skipped} line(s) that are not a step record skipped")
    if steps:
        speeds = [r["images_per_s"] for r in steps[1:] or steps]
        summary.update(final_loss=steps[-1]["loss"], images_per_s=sum(speeds) / len(speeds), step=steps[-1]["step"])
    return summary


def requeue_if_stopped(argv: list[str], job_dir: str) -> None:
    """After fastssl stopped on a signal short of the last step, hand SIGUSR1 on to submitit's handler (restored
    when the run closed its own), which requeues this job; the requeued job resumes from the checkpoint."""
    derived, _ = planned_derived(compose_config(argv))
    latest = latest_checkpoint(job_dir)
    step = int(re.search(r"(\d+)", latest.name).group(1)) if latest else 0
    if derived is not None and step < derived.total_iterations:
        signal.raise_signal(signal.SIGUSR1)


def knn_top1(job_dir: str) -> float | None:
    """fastssl-eval knn on the job's latest checkpoint: the learned trunk's top-1 (%)."""
    from .evaluate import main as eval_main

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = eval_main(["knn", "--checkpoint", job_dir])
    lines = output.getvalue().strip().splitlines()
    return json.loads(lines[-1])["knn_top1"]["trained"] if status == 0 and lines else None


# ---------------- the summary ------------------------------------------------------------------------

def collect(returns, sweep_dir: Path) -> list[dict]:
    """Each job's record: from the launcher's returns (basic and submitit launchers), else (a sweeper that
    returns none, as Optuna's) from the job files under the sweep directory."""
    if isinstance(returns, list) and all(isinstance(batch, list) for batch in returns):
        return [job_return.return_value for batch in returns for job_return in batch]
    return [json.loads(path.read_text()) for path in sorted(sweep_dir.glob(f"*/{JOB_FILE}"))]


def summary_table(records: list[dict]) -> str:
    def figure(value, form):
        return format(value, form) if value is not None else "-".rjust(int(form.split(".")[0]))

    rows = [f"{'job':>4} {'status':>6} {'loss':>9} {'img/s':>9} {'kNN top-1':>9}  overrides"]
    for record in records:
        rows.append(f"{record['job']:>4} {record['status']:>6} {figure(record.get('final_loss'), '9.4f')} "
                    f"{figure(record.get('images_per_s'), '9.1f')} {figure(record.get('knn_top1'), '9.2f')}  "
                    f"{' '.join(record['overrides']) or '(none)'}")
    return "\n".join(rows)
