"""fastssl-bench train: the training step of any config, end to end and broken down, beside a bare loop.

    fastssl-bench train                                        # the SwAV seed recipe (a GPU; the CPU demo otherwise)
    fastssl-bench train --config pretrain/swav/swav_1node_cpu_resnet18 config.DATA.TRAIN.LOADER=ffcv
    fastssl-bench train --config pretrain/npid/npid_1node_cpu_resnet18 --warmup 3 --steps 10

fastssl's own loop (fastssl/engine.py, the config's loader, method and optimizer, as ``fastssl-train``
builds them) runs ``--warmup`` then ``--steps`` timed steps within one epoch. Each step is split into
data (waiting for the loader), forward, loss (the method's step minus the forward), backward,
optimizer and the method's hooks (before/after the optimizer step); on a GPU the device is synchronised
at each boundary for the breakdown, so the end-to-end figure comes from a second, unsynchronised pass.
Beside it, the same model, crops and batch in a bare loop (random tensors already on the device,
forward, the mean of the outputs as the loss, backward, a plain SGD step), half of its steps just before
fastssl's loop and half just after (a drifting machine moves both alike), is the compute ceiling:

    loop overhead = (fastssl step - its data wait - bare step) / bare step,   end to end = images/s ratio.

On a GPU it adds the achieved FLOP/s (FLOPs per image counted once with torch's FLOP counter, forward and
backward) and their share of the card's dense bf16 peak. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time

import torch

import fastssl.engine as engine
from benchmarks.kernels import git_commit, machine
from fastssl import dist
from fastssl.builder import build_run, select_device
from fastssl.checkpoint import TrainState
from fastssl.config import compose_config
from fastssl.metrics import RunLogger
from fastssl.run_model import build_run_model

GPU_CONFIG, CPU_CONFIG = "pretrain/swav/swav_8node_resnet", "pretrain/swav/swav_1node_cpu_resnet18"
# The seed recipe on one GPU: its model, crops and batch, on the built-in dataset.
GPU_OVERRIDES = ["config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]
# Dense bf16 tensor-core peak (FLOP/s) by card, for the share of peak.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PARTS = ("data", "forward", "loss", "backward", "optimizer", "hooks")


class StepTimers:
    """Wall-clock seconds of each part of each step (device-synchronised when ``sync``)."""

    def __init__(self, *, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.steps: list[dict] = []
        self.current: dict = {}

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.current[part] = self.current.get(part, 0.0) + seconds

    def timed(self, part: str, function):
        def wrapper(*args, **kwargs):
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(part, self.now() - start)
        return wrapper


class TimedLoader:
    """The run's loader, timing each wait for a batch and closing a step's record at each new batch."""

    def __init__(self, loader, timers: StepTimers):
        self.loader, self.timers = loader, timers

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        timers, batches, step_start = self.timers, iter(self.loader), None
        while True:
            wait_start = timers.now()
            batch = next(batches, None)
            wait = timers.now() - wait_start
            if step_start is not None:  # the previous step ran from its own wait to this one
                timers.steps.append({**timers.current, "total": wait_start - step_start})
                timers.current = {}
            if batch is None:
                return
            timers.current["data"], step_start = wait, wait_start
            yield batch


class StopAfter:
    """stop_requested for the loop: True once ``steps`` steps have run (the loop then checkpoints and returns)."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.steps


def fastssl_steps(argv: list[str], *, warmup: int, steps: int, sync: bool,
                  before=None) -> tuple[list[dict], dict]:
    """Per-step timings of fastssl's loop for ``argv`` (the fastssl-train grammar) and the run's settings.
    ``before(settings)``, if given, runs once the run is built, just before its loop (the bare loop's first half)."""
    with tempfile.TemporaryDirectory() as directory:
        cfg = compose_config(argv + [f"config.CHECKPOINT.DIR={directory}", "config.CHECKPOINT.AUTO_RESUME=False",
                                     "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1000"])
        info = dist.from_environment()
        device = select_device(cfg, info)
        # One more step than timed: a step is closed when the next batch is asked for.
        run = build_run(cfg, info=info, device=device, stop_requested=StopAfter(warmup + steps + 1))
        if run.derived.iterations_per_epoch < warmup + steps + 2:
            raise SystemExit(f"fastssl-bench train: {run.derived.iterations_per_epoch} steps per epoch; the benchmark "
                             f"needs {warmup + steps + 2} in one epoch (lower --steps or raise the dataset size)")
        timers = StepTimers(device=device, sync=sync)
        run.trained_model.forward = timers.timed("forward", run.trained_model.forward)
        run.method.training_loss = timers.timed("loss_and_forward", run.method.training_loss)
        run.optimizer.step = timers.timed("optimizer", run.optimizer.step)
        run.method.before_step = timers.timed("hooks", run.method.before_step)
        run.method.after_step = timers.timed("hooks", run.method.after_step)
        original_step = engine.optimizer_step
        engine.optimizer_step = timers.timed("backward_and_step", original_step)
        settings = {"batch_size": run.derived.batch_size_per_replica, "crop_sizes": run.derived.crop_sizes,
                    "autocast": str(run.settings.autocast_dtype), "device": device, "cfg": cfg,
                    "head_params": run.checkpoint.extra_state["head_params"], "loader": cfg.DATA.TRAIN.LOADER,
                    "method": cfg.LOSS.name}
        if before is not None:
            before(settings)
        run.method.on_train_start(model=run.model, loader=run.loader, fresh_start=True)
        logger = RunLogger(directory=directory, enabled=False, use_tensorboard=False, progress_bar=False,
                           total_steps=run.derived.total_iterations, start_step=0)
        try:
            engine.train(model=run.model, trained_model=run.trained_model, method=run.method, optimizer=run.optimizer,
                         scaler=run.scaler, loader=TimedLoader(run.loader, timers), state=TrainState(),
                         settings=run.settings, checkpoint=run.checkpoint, logger=logger)
        finally:
            engine.optimizer_step = original_step
    return [_parts(step) for step in timers.steps[warmup:warmup + steps]], settings


def _parts(step: dict) -> dict:
    forward = step.get("forward", 0.0)
    hooks, optimizer = step.get("hooks", 0.0), step.get("optimizer", 0.0)
    return {"data": step.get("data", 0.0), "forward": forward,
            "loss": step.get("loss_and_forward", 0.0) - forward,
            "backward": step.get("backward_and_step", 0.0) - optimizer - hooks,
            "optimizer": optimizer, "hooks": hooks, "total": step["total"]}


def bare_steps(settings: dict, *, warmup: int, steps: int) -> list[float]:
    """Seconds per step of the same model, crops and batch with random inputs on the device and plain SGD."""
    cfg, device = settings["cfg"], settings["device"]
    model = build_run_model(cfg, head_params=settings["head_params"]).to(device).train()
    memory_format = torch.channels_last if cfg.MODEL.CHANNELS_LAST else torch.contiguous_format
    dtype = getattr(torch, settings["autocast"].replace("torch.", "")) if settings["autocast"] != "None" else None
    crops = [torch.randn(settings["batch_size"], 3, size, size, device=device).contiguous(memory_format=memory_format)
             for size in settings["crop_sizes"]]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            loss = _mean_of(model(crops))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def _mean_of(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean()
    return sum(_mean_of(o) for o in outputs if o is not None)


def flops_per_image(settings: dict) -> float:
    """Forward + backward FLOPs of one training image (all its crops), counted once by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg, device = settings["cfg"], settings["device"]
    model = build_run_model(cfg, head_params=settings["head_params"]).to(device).train()
    crops = [torch.randn(2, 3, size, size, device=device) for size in settings["crop_sizes"]]
    with FlopCounterMode(display=False) as counter:
        _mean_of(model(crops)).backward()
    return counter.get_total_flops() / 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="fastssl-bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help=f"a seed config (default: {GPU_CONFIG} on a GPU, "
                                                       f"{CPU_CONFIG} otherwise)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config.KEY=value, as for fastssl-train")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = args.config or (GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG)
    command_line = [f"config={config}", *(GPU_OVERRIDES if config == GPU_CONFIG else []), *args.overrides]

    # The bare loop runs half before and half after fastssl's loop (in the same process, the run built), so
    # that a machine whose speed drifts (a VM's steal time) moves both alike; both halves are reported.
    bare_before: list[float] = []
    half = max(1, args.steps // 2)

    def run_bare_before(settings: dict) -> None:
        bare_before.extend(bare_steps(settings, warmup=args.warmup, steps=half))

    breakdown, settings = fastssl_steps(command_line, warmup=args.warmup, steps=args.steps, sync=True,
                                        before=run_bare_before)
    if settings["device"].type == "cuda":  # the breakdown synchronised the device; time the real overlap too
        end_to_end, _ = fastssl_steps(command_line, warmup=args.warmup, steps=args.steps, sync=False)
    else:
        end_to_end = breakdown
    bare_after = bare_steps(settings, warmup=args.warmup, steps=max(1, args.steps - half))
    bare = bare_before + bare_after
    batch = settings["batch_size"]
    median = {part: statistics.median(step[part] for step in breakdown) for part in (*PARTS, "total")}
    step_time = statistics.median(step["total"] for step in end_to_end)
    data_wait = statistics.median(step["data"] for step in end_to_end)
    bare_time = statistics.median(bare)
    figures = {
        "method": settings["method"], "loader": settings["loader"], "batch_size": batch,
        "crop_sizes": settings["crop_sizes"], "autocast": settings["autocast"],
        "seconds_per_step": step_time, "images_per_s": batch / step_time, "data_wait_share": data_wait / step_time,
        "breakdown_seconds": median, "bare_seconds_per_step": bare_time, "bare_images_per_s": batch / bare_time,
        "bare_seconds_before_after": [statistics.median(bare_before), statistics.median(bare_after)],
        "loop_overhead": (step_time - data_wait - bare_time) / bare_time,
        "end_to_end_vs_bare": bare_time / step_time,
    }
    device = settings["device"]
    if device.type == "cuda":
        per_image = flops_per_image(settings)
        achieved = per_image * batch / step_time
        peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None)
        figures.update(flops_per_image=per_image, achieved_flops=achieved,
                       share_of_bf16_peak=achieved / peak if peak else None)
    _print_table(figures, config=config)
    record = {"benchmark": "train", "machine": machine(device), "commit": git_commit(),
              "command": "fastssl-bench train " + shlex.join(sys.argv[2:] if argv is None else argv),
              "figures": figures}
    print(json.dumps(record))
    return figures


def _print_table(figures: dict, *, config: str) -> None:
    print(f"{config}: {figures['method']}, loader {figures['loader']}, batch {figures['batch_size']}, "
          f"crops {figures['crop_sizes']}, autocast {figures['autocast']}")
    print(f"{'':<28}{'s/step':>10}{'images/s':>11}")
    print(f"{'fastssl step':<28}{figures['seconds_per_step']:>10.4f}{figures['images_per_s']:>11.1f}")
    print(f"{'bare loop (ceiling)':<28}{figures['bare_seconds_per_step']:>10.4f}{figures['bare_images_per_s']:>11.1f}"
          "   (median of {:.4f} before and {:.4f} after fastssl's loop)".format(*figures["bare_seconds_before_after"]))
    for part in PARTS:
        print(f"  {part:<26}{figures['breakdown_seconds'][part]:>10.4f}")
    print(f"data-wait share {figures['data_wait_share']:.1%}; loop overhead {figures['loop_overhead']:+.1%}; "
          f"end to end {figures['end_to_end_vs_bare']:.2f}x the bare loop")
    if "achieved_flops" in figures:
        share = figures["share_of_bf16_peak"]
        print(f"{figures['flops_per_image'] / 1e9:.1f} GFLOP per image; {figures['achieved_flops'] / 1e12:.1f} TFLOP/s"
              + (f" = {share:.1%} of the bf16 peak" if share else ""))


if __name__ == "__main__":
    main()
