"""fastssl-train's command line: VISSL's overrides, Hydra's flags (--help, --cfg job, -m) and launcher words.

    fastssl-train config=pretrain/swav/swav_1node_cpu_resnet18 config.OPTIMIZER.num_epochs=1 --cfg job
    fastssl-train -m config=... config.LOSS.swav_loss.epsilon=0.03,0.05 hydra/launcher=submitit_slurm

``read_command`` separates the flags and the ``hydra...`` words from the config overrides, which
fastssl/config.py composes as before; ``help_text`` lists the seed recipes and groups that exist.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import CONFIG_DIR, ConfigError

HYDRA_PREFIXES = ("hydra/", "hydra.", "+hydra", "++hydra", "~hydra")


@dataclass
class Command:
    """A parsed fastssl-train command line: the config overrides and what to do with them."""

    overrides: list[str] = field(default_factory=list)       # config=..., +config/...=..., config.KEY=value
    hydra_overrides: list[str] = field(default_factory=list)  # hydra/launcher=..., hydra.launcher.KEY=...
    help: bool = False
    show_config: bool = False   # --cfg job: print the composed config and the derived values, train nothing
    multirun: bool = False      # -m: one job per combination of the swept values, through Hydra's launcher
    knn: bool = False           # --knn: each job of a sweep reports its kNN top-1 (fastssl-eval knn)


def read_command(argv: list[str]) -> Command:
    """Split ``argv`` into flags, Hydra launcher words and config overrides. Raises ConfigError on an
    unknown flag. A ``hydra/...`` or ``hydra....`` word implies -m (a launcher runs the job)."""
    command, words = Command(), iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            command.help = True
        elif word in ("-m", "--multirun"):
            command.multirun = True
        elif word == "--knn":
            command.knn = True
        elif word in ("--cfg", "-c") or word.startswith("--cfg="):
            what = word.split("=", 1)[1] if "=" in word else next(words, "")
            if what != "job":
                raise ConfigError(f"--cfg takes job (the composed config and its derived values), got {what!r}")
            command.show_config = True
        elif re.fullmatch(r"--[a-z][-a-z]*|-[a-zA-Z]", word):
            raise ConfigError(f"unknown option {word!r} (see fastssl-train --help)")
        elif word.startswith(HYDRA_PREFIXES):
            command.hydra_overrides.append(word)
            command.multirun = True
        else:
            command.overrides.append(word)
    if command.show_config and command.multirun:
        raise ConfigError("--cfg job prints one job's config: drop -m and the hydra words")
    return command


def _recipes() -> tuple[list[str], dict[str, list[str]]]:
    """Seed recipes (configs/config/<area>/<method>/<name>.yaml) and option groups (one level deeper)."""
    root = CONFIG_DIR / "config"
    seeds, groups = [], {}
    for path in sorted(root.rglob("*.yaml")):
        parts = path.relative_to(root).with_suffix("").parts
        if len(parts) == 3:
            seeds.append("/".join(parts))
        else:
            groups.setdefault("/".join(parts[:-1]), []).append(parts[-1])
    return seeds, groups


def help_text() -> str:
    seeds, groups = _recipes()
    group_lines = [f"  +config/{group}=  {', '.join(options)}" for group, options in groups.items()]
    return "\n".join([
        "usage: fastssl-train config=SEED [+config/GROUP=OPTION ...] [config.KEY=VALUE ...] [--cfg job]",
        "       fastssl-train -m config=SEED config.KEY=V1,V2 ... [hydra/launcher=NAME] [hydra.launcher.KEY=V] [--knn]",
        "",
        "Trains a self-supervised model from VISSL's configs and command lines, e.g.",
        "  fastssl-train config=pretrain/swav/swav_8node_resnet config.LOSS.swav_loss.temperature=0.2",
        "",
        "seed recipes (config=...):",
        *(f"  {seed}" for seed in seeds),
        "option groups (+config/GROUP=OPTION, added on top of a seed):",
        *group_lines,
        f"keys (config.KEY=VALUE): every key and its default is documented once in {CONFIG_DIR / 'defaults.yaml'};",
        "  a misspelt key is an error naming the closest real one (exit status 2)",
        "",
        "options:",
        "  -h, --help        this message",
        "  --cfg job         print the composed, validated config and the derived values (global batch, scaled",
        "                    LR start/peak/end, iterations, queue length), then exit without training",
        "  -m, --multirun    a sweep: one job per combination of comma-separated values (config.KEY=a,b; Hydra's",
        "                    sweep grammar: range(1,4), choice(a,b); lists [a, b] are values, not sweeps); each job",
        "                    trains in SWEEP_DIR/<its swept overrides> (SWEEP_DIR: hydra.sweep.dir, default",
        "                    CHECKPOINT.DIR + '_sweep'); re-running the sweep resumes every job; a summary table",
        "                    and SWEEP_DIR/sweep.jsonl follow; the exit status is the number of failed jobs",
        "  --knn             each job of a sweep also reports its kNN top-1 (as fastssl-eval knn)",
        "",
        "launchers (with -m; a hydra/launcher word implies it):",
        "  hydra/launcher=basic            the jobs one after another in this process (the default)",
        "  hydra/launcher=submitit_local   each job in its own local process through submitit",
        "  hydra/launcher=submitit_slurm   each job submitted to SLURM: DISTRIBUTED.NUM_NODES nodes x",
        "                                  NUM_PROC_PER_NODE tasks per node (one per GPU); requeued on",
        "                                  preemption or time limit, resuming from its checkpoint",
        "  launcher keys: hydra.launcher.partition=, timeout_min= (minutes), gpus_per_node=, account=, qos=,",
        "    constraint=, cpus_per_task=, mem_gb=, max_num_timeout= (requeues after a time limit, default 10),",
        "    additional_parameters={...}, setup=[...]; nodes and tasks_per_node follow DISTRIBUTED",
        "  (submitit launchers: pip install 'fastssl[slurm]')",
    ])
