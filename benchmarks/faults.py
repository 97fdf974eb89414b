"""fastssl-bench faults: the fault harness. Each scenario runs the real fastssl-train command on the CPU (a
SwAV run of 12 steps on 32 px images, checkpoints every 3 steps), several trials with random timing drawn
from --seed, and checks what fastssl promises: a run loses nothing that was saved, and bad input is a
one-line error or a counted skip.

    fastssl-bench faults [--trials 10] [--seed 0] [--only kill9,sigterm,...] [--workdir DIR] [--fuzz 240]

Scenarios (issue 14):
  kill9            kill -9 at a random step, then the same command: every step's loss equals an uninterrupted run's
  kill9_2ranks     the same with 2 ranks (gloo), the launcher and both workers killed
  kill_in_save     kill -9 inside a checkpoint save (a test-only delay before the rename): the previous checkpoint
                   is intact, the unfinished file is never read as one, the next run resumes from the previous
  damaged          the latest checkpoint truncated, emptied, random bytes, or another config's: fall back with a
                   one-line warning naming it; none readable, or another trunk only: a one-line error
  full_disk        a save that hits a file-size limit (RLIMIT_FSIZE): one-line error, the previous checkpoint
                   intact, no partial file; the same command without the limit then finishes exactly
  sigterm          SIGTERM at a random step: a checkpoint, exit 0, an exact resume, each step logged once
  dying_rank       one worker of a 2-rank run killed: the job exits non-zero within DISTRIBUTED.TIMEOUT_SECONDS
                   plus 5 s, and no fastssl process is left (counted by an environment marker)
  unreadable       half the images replaced by garbage after the first step, for every loader backend: a counted
                   skip (or none where the backend read them before), no crash
  fuzz             random single-key config mutations of every seed recipe (benchmarks/config_fuzz.py)

Prints a table (scenario, trials, passed, what was checked) and one JSON line. The recipe, the process
control and the checks that the scenarios share are benchmarks/fault_harness.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.fault_harness import (STEPS, Harness, Result, logged_losses, one_line_error, same_run, sha256,
                                      wait_for_step)


# ---------------- the scenarios: each returns a Result ----------------------------------------------------

def kill9(h: Harness, trials: int, *, ranks: int = 1) -> Result:
    result = Result(f"kill9{'_2ranks' if ranks == 2 else ''}",
                    f"kill -9 of the {'launcher (its workers must follow within 5 s)' if ranks == 2 else 'run'} at a "
                    f"random step, the same command again: all {STEPS} steps logged once with an uninterrupted run's "
                    "losses, final weights equal")
    reference, seconds = h.reference(ranks), []
    for _ in range(trials):
        directory, step = h.fresh(result.scenario), h.rng.randrange(1, STEPS)
        process = h.start(h.command(directory, ranks=ranks))
        reached = wait_for_step(directory, step, process)
        time.sleep(h.rng.uniform(0.0, 0.3))  # anywhere inside the step, a save included
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the command's process group (the launcher's, with 2 ranks)
        h.finish(process)
        left, gone_after = h.wait_until_gone(timeout_s=5.0)
        seconds.append(round(gone_after, 2))
        done = h.run(h.command(directory, ranks=ranks))
        why = ("" if reached else "the run ended before the kill") or \
            (f"{len(left)} processes left 5 s after the kill" if left else "") or \
            (f"exit {done.status}: {done.stderr.strip()[-300:]}" if done.status else "") or same_run(directory,
                                                                                                      reference)
        result.trial(not why, f"kill at step {step}: {why}")
    result.figures["seconds_until_no_process_left"] = seconds
    return result


def kill_in_save(h: Harness, trials: int) -> Result:
    from fastssl.checkpoint import SAVE_DELAY_VARIABLE, list_checkpoints, load_checkpoint

    result = Result("kill_in_save", "kill -9 while a checkpoint's temporary file is written (a 2 s test delay "
                    "before the rename): the previous checkpoints load, the unfinished file is not listed, the same "
                    "command resumes from the previous one and ends as an uninterrupted run")
    reference = h.reference()
    for _ in range(trials):
        directory = h.fresh("kill_in_save")
        process = h.start(h.command(directory), env={SAVE_DELAY_VARIABLE: "2"})
        target = h.rng.choice([2, 3])  # the n-th save (steps 3, 4, 6, ...) has a previous one
        why = ""
        while process.poll() is None:
            unfinished = list(directory.glob(".*.torch.tmp-*"))
            if unfinished and len(list_checkpoints(directory)) >= target - 1:
                time.sleep(h.rng.uniform(0.1, 1.5))
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        h.finish(process)
        left_behind = list(directory.glob(".*.torch.tmp-*"))
        saved = list_checkpoints(directory)
        if not left_behind:
            why = "the kill did not land inside a save"
        elif not saved or any(p.name.startswith(".") for p in saved):
            why = f"checkpoints listed: {[p.name for p in saved]}"
        else:
            try:
                previous = load_checkpoint(saved[-1])["step"]
            except Exception as error:  # noqa: BLE001
                why = f"the previous checkpoint does not load: {error}"
        if not why:
            done = h.run(h.command(directory))
            resumed = f"resuming from {saved[-1]}" in done.stderr
            why = (f"exit {done.status}" if done.status else "") or ("" if resumed else "did not resume from the "
                   f"previous checkpoint (step {previous})") or same_run(directory, reference) or \
                ("the unfinished file is still there" if any(p.exists() for p in left_behind) else "")
        result.trial(not why, why)
    return result


def _other_trunk_checkpoint(h: Harness) -> Path:
    """The last checkpoint of a 1-epoch run of the same recipe with a ResNet-34 trunk (made once)."""
    directory = h.workdir / "other_trunk"
    if not directory.exists():
        done = h.run(h.command(directory, "config.MODEL.TRUNK.RESNETS.DEPTH=34", "config.OPTIMIZER.num_epochs=1"))
        if done.status:
            raise RuntimeError(f"the ResNet-34 run failed: {done.stderr.strip()[-1000:]}")
    from fastssl.checkpoint import latest_checkpoint

    return latest_checkpoint(directory)


def _damage(path: Path, how: str, rng: random.Random, other: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: rng.randrange(1, len(data) - 1)])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random_bytes":
        path.write_bytes(rng.randbytes(len(data)))
    else:  # another run's config (another trunk) under this run's latest name
        shutil.copyfile(other, path)


def damaged(h: Harness, trials: int) -> Result:
    from fastssl.checkpoint import list_checkpoints

    result = Result("damaged", "latest checkpoint truncated / empty / random bytes / another config's: one warning "
                    "line naming it, resume from the one before, losses as uninterrupted; every checkpoint "
                    "damaged, or another trunk's only: exit 2 with one error line (naming the trunk setting)")
    reference, other = h.reference(), _other_trunk_checkpoint(h)
    for how in ["truncated", "empty", "random_bytes", "another_config"] * max(1, trials // 4):
        directory = h.fresh(f"damaged_{how}")
        for path in list_checkpoints(reference)[-2:]:  # steps 9 and 12
            shutil.copyfile(path, directory / path.name)
        older, latest = list_checkpoints(directory)
        _damage(latest, how, h.rng, other)
        done = h.run(h.command(directory))
        warnings = [line for line in done.stderr.splitlines() if "warning" in line and latest.name in line]
        why = (f"exit {done.status}: {done.stderr.strip()[-300:]}" if done.status else "") or \
            ("" if len(warnings) == 1 else f"{len(warnings)} warning lines naming {latest.name}") or \
            ("" if f"resuming from {older}" in done.stderr else "did not resume from the one before") or \
            same_run(directory, reference, from_step=9)
        result.trial(not why, f"{how}: {why}")
    for case in ("none_readable", "another_trunk_only"):
        directory = h.fresh(case)
        if case == "none_readable":
            shutil.copytree(reference, directory, dirs_exist_ok=True)
            for path in list_checkpoints(directory):
                _damage(path, "truncated", h.rng, other)
        else:
            shutil.copyfile(other, directory / other.name)
        done = h.run(h.command(directory))
        error = one_line_error(done.stderr)
        named = case == "none_readable" or "MODEL.TRUNK.RESNETS.DEPTH" in error
        why = (f"exit {done.status}" if done.status != 2 else "") or ("" if error else "not one error line: "
                                                                      + done.stderr.strip()[-300:]) or \
            ("" if named else f"the error does not name the trunk depth: {error}")
        result.trial(not why, f"{case}: {why}")
        result.figures[case] = error
    return result


def full_disk(h: Harness, trials: int) -> Result:
    from fastssl.checkpoint import list_checkpoints

    result = Result("full_disk", "a save beyond a file-size limit (RLIMIT_FSIZE: a third of a checkpoint): exit 2 "
                    "with one error line, the previous checkpoint byte-identical, no partial file; the same command "
                    "without the limit then ends as an uninterrupted run")
    reference = h.reference()
    for _ in range(trials):
        directory = h.fresh("full_disk")
        first = list_checkpoints(reference)[-2]  # step 9
        shutil.copyfile(first, directory / first.name)
        before = sha256(directory / first.name)
        done = h.run(h.command(directory), limit_file_bytes=first.stat().st_size // 3)
        error = one_line_error(done.stderr)
        partial = [p.name for p in directory.iterdir() if ".tmp-" in p.name or
                   (p.name.startswith("checkpoint_step") and p.name != first.name)]
        why = (f"exit {done.status}" if done.status != 2 else "") or ("" if error else "not one error line: " +
                                                                      done.stderr.strip()[-300:]) or \
            (f"partial files {partial}" if partial else "") or \
            ("" if sha256(directory / first.name) == before else "the previous checkpoint changed")
        if not why:
            again = h.run(h.command(directory))
            why = (f"the run without the limit: exit {again.status}" if again.status else "") or \
                same_run(directory, reference, from_step=9)
        result.trial(not why, why)
        result.figures["error"] = error
    return result


def sigterm(h: Harness, trials: int) -> Result:
    from fastssl.checkpoint import latest_checkpoint, load_checkpoint

    result = Result("sigterm", "SIGTERM at a random step (preemption): exit 0 with a checkpoint at the stop, then "
                    f"the same command: all {STEPS} steps logged once with an uninterrupted run's losses")
    reference = h.reference()
    for _ in range(trials):
        for attempt in range(3):  # a fast machine can finish the last steps during the random delay: draw again
            directory, step = h.fresh("sigterm"), h.rng.randrange(1, STEPS - 2 - 3 * attempt)
            process = h.start(h.command(directory))
            reached = wait_for_step(directory, step, process)
            time.sleep(h.rng.uniform(0.0, 0.3 / (1 + attempt)))
            process.send_signal(signal.SIGTERM)
            stopped = h.finish(process)
            finished_first = not stopped.status and "stopped by a signal" not in stopped.stderr and \
                [s for s, _ in logged_losses(directory)] == list(range(STEPS))
            if not finished_first:
                break
        latest = latest_checkpoint(directory)
        at = load_checkpoint(latest)["step"] if latest else None
        why = ("" if reached else "ended before the signal") or (f"exit {stopped.status}" if stopped.status else "") \
            or ("" if "stopped by a signal" in stopped.stderr else "no stop notice") or \
            ("" if at is not None and at == max(s for s, _ in logged_losses(directory)) + 1 else
             f"the checkpoint (step {at}) is not at the stop")
        if not why:
            done = h.run(h.command(directory))
            why = (f"resume: exit {done.status}" if done.status else "") or same_run(directory, reference)
        result.trial(not why, f"signal at step {step}: {why}")
    return result


def _rank_pid(h: Harness, rank: int) -> int | None:
    """The pid of worker ``rank`` (not its DataLoader workers: the process whose parent is not that rank)."""
    ranked = {}
    for pid in h.processes():
        try:
            environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if b"=" in item)
            parent = int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])
        except (OSError, ValueError):
            continue
        if environ.get(b"RANK") == str(rank).encode():
            ranked[pid] = parent
    return next((pid for pid, parent in ranked.items() if parent not in ranked), None)


def dying_rank(h: Harness, trials: int, *, timeout_s: int = 20) -> Result:
    result = Result("dying_rank", f"kill -9 of rank 1 of a 2-rank run (DataLoader workers 1) at a random step: the "
                    f"job exits non-zero within DISTRIBUTED.TIMEOUT_SECONDS ({timeout_s} s) + 5 s, naming the rank; "
                    "no fastssl process left (counted by an environment marker)")
    seconds = []
    for _ in range(trials):
        directory, step = h.fresh("dying_rank"), h.rng.randrange(1, STEPS - 1)
        process = h.start(h.command(directory, f"config.DISTRIBUTED.TIMEOUT_SECONDS={timeout_s}",
                                    "config.DATA.NUM_DATALOADER_WORKERS=1", ranks=2))
        reached = wait_for_step(directory, step, process)
        victim = _rank_pid(h, 1)
        if victim is None or not reached:
            os.killpg(process.pid, signal.SIGKILL)
            h.finish(process)
            result.trial(False, "no rank 1 to kill" if reached else "ended before the kill")
            continue
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        done = h.finish(process, timeout_s=timeout_s + 60)
        elapsed = time.monotonic() - killed_at
        time.sleep(1.0)
        left = h.processes()
        seconds.append(round(elapsed, 2))
        why = ("exit 0" if done.status == 0 else "") or \
            (f"took {elapsed:.1f} s" if elapsed > timeout_s + 5 else "") or \
            (f"{len(left)} fastssl processes left" if left else "") or \
            ("" if "rank 1" in done.stderr else "the error does not name rank 1")
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        result.trial(not why, f"kill at step {step}: {why}")
    result.figures["seconds_to_exit"] = seconds
    return result


SKIP_LINE = "skipping an unreadable image"


def unreadable(h: Harness, trials: int, *, backends: tuple[str, ...] = ("torchvision", "dali", "ffcv")) -> Result:
    from loaders.synthetic import ensure_synthetic_dataset

    result = Result("unreadable", "after the first step, half the images of the folder are overwritten with random "
                    "bytes; 2 epochs on each loader backend: exit 0, every failed read a counted skip (torchvision, "
                    "DALI); FFCV reads the .beton it wrote at start, so it meets none")
    source = ensure_synthetic_dataset(h.workdir / "images", image_size=32, train_per_class=4, val_per_class=2,
                                      seed=0) / "train"
    for backend in backends * trials:
        directory = h.fresh(f"unreadable_{backend}")
        folder = directory / "images"
        shutil.copytree(source, folder)
        process = h.start(h.command(directory, "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
                                    f"config.DATA.TRAIN.DATA_PATHS=[{folder}]", f"config.DATA.TRAIN.LOADER={backend}",
                                    "config.OPTIMIZER.num_epochs=2", "config.DATA.TRAIN.DATA_LIMIT=-1"))
        reached = wait_for_step(directory, 1, process)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        replaced = h.rng.sample(files, len(files) // 2)
        for path in replaced:
            path.write_bytes(h.rng.randbytes(path.stat().st_size))
        done = h.finish(process)
        skips = sorted({line.rsplit(": ", 1)[-1] for line in done.stderr.splitlines() if SKIP_LINE in line})
        expected = backend != "ffcv"
        why = ("" if reached else f"ended before the images were replaced: {done.stderr.strip()[-300:]}") or \
            (f"exit {done.status}: {done.stderr.strip()[-400:]}" if done.status else "") or \
            ("no skip counted" if expected and not skips else "") or \
            (f"{len(skips)} skips where none were expected" if not expected and skips else "") or \
            ("" if {Path(s).name for s in skips} <= {p.name for p in replaced} else "a skip of an intact image")
        result.figures.setdefault("skipped", {}).setdefault(backend, []).append(len(skips))
        result.trial(not why, f"{backend}: {why}")
    return result


def fuzz(h: Harness, count: int) -> Result:
    from benchmarks.config_fuzz import fuzz as run_fuzz

    result = Result("fuzz", f"{count} random single-key mutations of every seed recipe (misspelt keys at every depth, "
                    "inside TRANSFORMS and HEAD.PARAMS too, wrong types, out-of-range values, crop scales and counts, "
                    "unknown LOSS.name): exit 2, one error line naming the key, no traceback")
    outcomes, bad_seeds = run_fuzz(count, seed=h.rng.randrange(1 << 30))
    for seed in bad_seeds:
        result.trial(False, f"seed {seed} fails unmutated")
    for outcome in outcomes:
        result.trial(outcome.passed, f"{outcome.mutation.seed} {outcome.mutation.word[:100]}: {outcome.why}")
    kinds = {}
    for outcome in outcomes:
        kinds[outcome.mutation.kind] = kinds.get(outcome.mutation.kind, 0) + 1
    result.figures["kinds"] = kinds
    return result


SCENARIOS = {
    "kill9": lambda h, n, f: kill9(h, n), "kill9_2ranks": lambda h, n, f: kill9(h, n, ranks=2),
    "kill_in_save": lambda h, n, f: kill_in_save(h, max(1, n // 3)), "damaged": lambda h, n, f: damaged(h, 4),
    "full_disk": lambda h, n, f: full_disk(h, max(1, n // 5)), "sigterm": lambda h, n, f: sigterm(h, n),
    "dying_rank": lambda h, n, f: dying_rank(h, max(1, n // 3)),
    "unreadable": lambda h, n, f: unreadable(h, max(1, n // 5)),
    "fuzz": lambda h, n, f: fuzz(h, f),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-bench faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials of kill9, kill9_2ranks and sigterm "
                        "(kill_in_save and dying_rank a third, full_disk and unreadable (per backend) a fifth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--fuzz", type=int, default=240, help="config mutations")
    parser.add_argument("--workdir", default=None, help="kept when given (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; one of {', '.join(SCENARIOS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastssl-faults-"))
    harness, results, started = Harness(workdir, random.Random(args.seed)), [], time.monotonic()
    try:
        for name in names:
            began = time.monotonic()
            results.append(SCENARIOS[name](harness, args.trials, args.fuzz))
            results[-1].figures["seconds"] = round(time.monotonic() - began, 1)
            print(f"{name}: {results[-1].passed}/{results[-1].trials} passed", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    print(json.dumps({"benchmark": "faults", "seed": args.seed, "seconds": round(time.monotonic() - started, 1),
                      "scenarios": [vars(r) for r in results]}))
    return 0 if all(r.passed == r.trials for r in results) else 1


def print_table(results: list[Result]) -> None:
    print(f"{'scenario':<14} {'trials':>6} {'passed':>6}  checked")
    for r in results:
        print(f"{r.scenario:<14} {r.trials:>6} {r.passed:>6}  {r.checked}")
        for failure in r.failures[:5]:
            print(f"{'':<29}FAILED {failure}")
