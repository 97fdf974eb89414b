"""fastssl-train: the entry point.

    fastssl-train config=pretrain/swav/swav_8node_resnet config.LOSS.swav_loss.temperature=0.2
    fastssl-train config=... --cfg job        # the composed config and derived values; trains nothing
    fastssl-train -m config=... config.KEY=a,b # a sweep through Hydra's launchers (fastssl/sweep.py)

``main`` composes the config and runs here or spawns the workers; ``run`` is one worker: the run
builder (fastssl/builder.py) turns the config into objects, the checkpoint restores them, the loop trains.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback

from . import dist, launch, sweep
from .builder import (build_cluster_features, build_run, check_checkpoint_dir, engine_name, notice, plan_processes,
                      preflight, select_device, start_process_group)
from .checkpoint import TrainState
from .cli import help_text, read_command
from .clusterfit import cluster_features
from .config import ConfigError, compose_config
from .engine import NonFiniteLossError, train
from .plot import write_run_curves
from .run_data import describe_job


def run(cfg):
    """Train (or, for ENGINE_NAME cluster_features, run ClusterFit step 1) in this process: the only one,
    or one worker of a distributed run (see launch.py)."""
    info = dist.from_environment()
    device = select_device(cfg, info)
    stop = start_process_group(cfg, info, device)
    try:
        if engine_name(cfg) == "cluster_features":
            job = build_cluster_features(cfg, info=info, device=device,
                                         signal_received=lambda: stop.received is not None)
            stop.setup_done()
            return cluster_features(job)
        return train_run(cfg, info=info, device=device, stop=stop)
    finally:
        stop.close()


def train_run(cfg, *, info: dist.DistInfo, device, stop: dist.StopOnSignal) -> TrainState:
    """Build, resume from the latest checkpoint (CHECKPOINT.AUTO_RESUME), train, then the method's final
    metrics (method.on_train_end: linear evaluation's held-out accuracy), printed and logged."""
    run = build_run(cfg, info=info, device=device, stop_requested=stop)
    restored = run.checkpoint.restore_latest(map_location=device) if run.auto_resume else None
    state = restored[0] if restored else TrainState()
    if restored:
        notice(f"resuming from {restored[1]} (epoch {state.epoch}, step {state.step})")
    run.method.on_train_start(model=run.model, loader=run.loader, fresh_start=restored is None)

    logger = run.logger(start_step=state.step)
    stop.setup_done()
    try:
        state = train(model=run.model, trained_model=run.trained_model, method=run.method, optimizer=run.optimizer,
                      scaler=run.scaler, loader=run.loader, state=state, settings=run.settings,
                      checkpoint=run.checkpoint, logger=logger)
        stopped = (stop.stopped or run.settings.monitor is not None and run.settings.monitor.collapse_stop) \
            and state.step < run.derived.total_iterations
        final_metrics = None if stopped else run.method.on_train_end(model=run.model, test_loader=run.test_loader)
        if final_metrics:
            logger.log_final(final_metrics, step=state.step)
    finally:
        logger.close()
    if info.is_main:
        try:
            notice(f"curves of the run: {write_run_curves(run.checkpoint.directory)}")
        except (FileExistsError, OSError) as error:  # a curves.png that fastssl-plot did not write stays
            notice(f"no curves written: {error}")
    skipped = getattr(run.loader, "skipped", {})  # the torchvision and DALI loaders count unreadable files
    if skipped:
        notice(f"{len(skipped)} unreadable image(s) skipped {sum(skipped.values())} time(s) in all, each replaced "
               "by the next readable one (named in the warnings above)")
    if stopped and not stop.stopped:
        notice(f"stopped at step {state.step}, the embedding collapsed (MONITOR.EMBEDDING.STOP_ON_COLLAPSE), with a "
               f"checkpoint in {run.checkpoint.directory}")
    elif stopped:
        notice(f"stopped by a signal at step {state.step} with a checkpoint in {run.checkpoint.directory}; "
               "the same command resumes")
    else:
        notice(f"training finished at step {state.step}; checkpoints in {run.checkpoint.directory}")
    return state


def fail(message: str, status: int) -> int:
    """Print an error (a spawned worker hands it to its launcher, which prints the first one once)."""
    if not launch.record_error(message):
        print(message, file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """fastssl-train: run here, or spawn DISTRIBUTED.NUM_PROC_PER_NODE workers (see launch.py)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = read_command(argv)
        if command.help:
            print(help_text())
            return 0
        if command.multirun:
            return sweep.multirun(command)
        argv = command.overrides
        cfg = compose_config(argv)
        preflight(cfg)
        if command.show_config:
            print(describe_job(cfg))
            return 0
        if not launch.spawned_by_launcher():  # a spawned worker's launcher has checked it
            warning = check_checkpoint_dir(cfg)  # before any data or model is built
            if warning:
                notice(warning)
        plan = plan_processes(cfg)
        if plan.notice:
            notice(plan.notice)
        if plan.spawn:
            return launch.run_workers(command=[sys.executable, "-P", "-m", "fastssl.train", *argv],
                                      num_workers=plan.spawn, node_rank=plan.node_rank, world_size=plan.world_size,
                                      master_addr=plan.master_addr, master_port=plan.master_port)
        os.environ.update(plan.worker_env)
        launch.exit_with_launcher()
        run(cfg)
    except ConfigError as error:
        return fail(f"fastssl-train: error: {error}", 2)
    except NonFiniteLossError as error:
        return fail(f"fastssl-train: error: {error}", 3)
    except (FileNotFoundError, ValueError, ImportError) as error:  # bad paths, lists, a backend not installed
        if os.environ.get("FASTSSL_DEBUG"):  # the traceback, for a bug rather than bad input
            raise
        return fail(f"fastssl-train: error: {error}", 2)
    except dist.StoppedDuringSetup as stopped:
        return fail(f"fastssl-train: stopped by {signal.Signals(stopped.signum).name} during set-up, before the first "
                    "step: nothing was trained and no checkpoint written", 128 + stopped.signum)
    except KeyboardInterrupt:
        print("fastssl-train: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    except Exception:
        if not launch.record_error(traceback.format_exc()):
            raise
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
