"""Attacks on fastssl's data and its bounds (issue 23, sections 1 and 4): crafted .beton files, a planted
cache file, directory links into a loop, a decompression bomb, configs that ask for too much, SIGTERM during
set-up. Each scenario runs the real fastssl-train command (a subprocess with a timeout and an address-space
cap, as `ulimit -v` sets) against a crafted input and judges what fastssl promises: refused with a one-line
error or a counted skip, nothing corrupted, memory bounded.

    python -m benchmarks.attacks_data [--workdir DIR] [--only beton_random_bytes,...]

Prints a table (scenario, outcome, peak RSS, detail) and one JSON line. `SCENARIOS` is the list that
`fastssl-bench attacks` (benchmarks/attacks.py) joins: each `scenario(workdir) -> dict` with name, outcome
("refused" | "skipped" | "ok" | "FAILED"), a one-line detail and the command's peak RSS in MB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.fault_harness import TINY, one_line_error

ADDRESS_SPACE_CAP = 12_000_000 * 1024  # bytes: `ulimit -v 12000000`, as the runs were capped
TIMEOUT_S = 900  # a loaded 2-core machine took 2 minutes for one step of the tiny recipe

# ---------------- crafting the inputs --------------------------------------------------------------------

HEADER_BYTES, DESCRIPTOR_BYTES, METADATA_BYTES = 24, 1041, 32  # FFCV 1.0.2's layout of a 3-field .beton


def make_image_folder(root: Path, *, classes: int, per_class: int, size: int = 24, seed: int = 0) -> Path:
    """An ImageFolder of per_class random JPEGs per class."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        directory = root / f"class{label}"
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"{i:04d}.jpg", quality=90)
    return root


def convert(folder: Path, output: Path, *, write_mode: str) -> Path:
    """fastssl-convert, in this process (its result is a valid .beton to damage)."""
    from loaders.convert import main

    main([str(folder), str(output), "--write-mode", write_mode, "--max-resolution", "32", "--num-workers", "1",
          "--no-progress"])
    return output


def set_image_sizes(beton: Path, *, height: int, width: int) -> None:
    """Edit every record's metadata to claim height x width pixels (the records keep their bytes)."""
    data = bytearray(beton.read_bytes())
    num_samples = struct.unpack_from("<Q", data, 8)[0]
    for i in range(num_samples):
        row = HEADER_BYTES + 3 * DESCRIPTOR_BYTES + i * METADATA_BYTES
        struct.pack_into("<HH", data, row + 1, width, height)  # image field: mode u1, width u2, height u2
    beton.write_bytes(bytes(data))


def set_sample_count(beton: Path, count: int) -> None:
    data = bytearray(beton.read_bytes())
    struct.pack_into("<Q", data, 8, count)
    beton.write_bytes(bytes(data))


def decompression_bomb_png(path: Path, *, side: int) -> None:
    """A 16-bit greyscale PNG declaring side x side pixels whose data is a few kB (it decodes to zeros, short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 65536))
                     + chunk(b"IEND", b""))


# ---------------- running a command --------------------------------------------------------------------

def run_capped(argv: list[str], *, env: dict, cwd: Path, timeout_s: float = TIMEOUT_S,
               signal_when=None) -> tuple[int, str, str, float]:
    """Run argv in its own process group, its address space capped; (status, stdout, stderr, peak RSS MB).

    signal_when: a function polled every 50 ms; when it returns True the process group gets SIGTERM once.
    The peak RSS is that of the command's own process (os.wait4's ru_maxrss, which also counts the children
    it waited for)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True,
                                   preexec_fn=cap)
        timer = threading.Timer(timeout_s, lambda: _kill_group(process.pid, signal.SIGKILL))
        timer.start()
        if signal_when is not None:
            threading.Thread(target=_signal_when, args=(process.pid, signal_when), daemon=True).start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        _kill_group(process.pid, signal.SIGKILL)  # anything it left behind
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), usage.ru_maxrss / 1024


def _kill_group(pid: int, number: int) -> None:
    try:
        os.killpg(pid, number)
    except ProcessLookupError:
        pass


def _signal_when(pid: int, condition) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if condition():
            _kill_group(pid, signal.SIGTERM)
            return
        time.sleep(0.05)


def train_command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastssl.train", *TINY, *extra, f"config.CHECKPOINT.DIR={workdir / 'run'}"]


def environment(workdir: Path) -> dict:
    return {**os.environ, "FASTSSL_CACHE": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}


def result(name: str, outcome: str, detail: str, peak_rss_mb: float | None) -> dict:
    return {"name": name, "outcome": outcome, "detail": " ".join(detail.split())[:300], "peak_rss_mb": peak_rss_mb}


def judge_refusal(name: str, status: int, stderr: str, peak: float, *, must_name: str) -> dict:
    """refused: exit 2 and exactly one 'fastssl-train: error:' line, no traceback, naming `must_name`."""
    line = one_line_error(stderr)
    if status == 2 and line and must_name in line:
        return result(name, "refused", line, peak)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return result(name, "FAILED", f"exit {status}: {last}", peak)


def ffcv_run(workdir: Path, beton: Path) -> list[str]:
    return train_command(workdir, "config.DATA.TRAIN.DATA_SOURCES=[ffcv]", f"config.DATA.TRAIN.DATA_PATHS=[{beton}]",
                         "config.DATA.TRAIN.LOADER=ffcv", "config.DATA.TRAIN.DATA_LIMIT=-1",
                         "config.OPTIMIZER.num_epochs=1")


# ---------------- the scenarios ------------------------------------------------------------------------

def _bad_beton(name: str, craft) -> callable:
    """A scenario: fastssl-train on the .beton that craft(workdir) -> Path writes must be refused in one line."""
    def scenario(workdir: Path) -> dict:
        workdir.mkdir(parents=True, exist_ok=True)
        beton = craft(workdir)
        status, _, stderr, peak = run_capped(ffcv_run(workdir, beton), env=environment(workdir), cwd=workdir)
        return judge_refusal(name, status, stderr, peak, must_name=str(beton))

    scenario.__name__ = name
    return scenario


def _valid_beton(workdir: Path, *, write_mode: str = "raw") -> Path:
    folder = make_image_folder(workdir / "images", classes=2, per_class=8)
    return convert(folder, workdir / "valid.beton", write_mode=write_mode)


def _raw_records_claim_1x1(workdir: Path) -> Path:
    beton = _valid_beton(workdir)  # 24x24 raw records: 1,728 bytes each
    set_image_sizes(beton, height=1, width=1)
    return beton


def _random_bytes(workdir: Path) -> Path:
    beton = workdir / "random.beton"
    beton.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    return beton


def _truncated(workdir: Path) -> Path:
    beton = _valid_beton(workdir)
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    return beton


def _header_only(workdir: Path) -> Path:
    beton = _valid_beton(workdir)
    beton.write_bytes(beton.read_bytes()[:HEADER_BYTES])
    return beton


def _claims_2_to_the_34_samples(workdir: Path) -> Path:
    beton = _valid_beton(workdir)
    set_sample_count(beton, 1 << 34)
    return beton


def _records_larger_than_claimed(workdir: Path) -> Path:
    beton = _valid_beton(workdir)  # 24x24 records said to be 64x64: the decoder would read past each record
    set_image_sizes(beton, height=64, width=64)
    return beton


def beton_planted_in_cache(workdir: Path) -> dict:
    """A valid 64-record .beton (and a forged record of its conversion) planted at the cache path of a folder
    of 200 images: fastssl must not train on the 64 (here: it converts the folder again and trains on 200)."""
    from loaders import ffcv
    from loaders.images import list_samples

    name = "beton_planted_in_cache"
    workdir.mkdir(parents=True, exist_ok=True)
    folder = make_image_folder(workdir / "folder", classes=2, per_class=100)
    few = make_image_folder(workdir / "few", classes=2, per_class=32)
    listing = list_samples(folder, data_limit=-1)
    digest = ffcv._contents_digest(folder, listing, max_resolution=512, num_workers=1)
    planted = workdir / "cache" / "ffcv" / f"{folder.name}-{digest[:16]}.beton"
    planted.parent.mkdir(parents=True)
    convert(few, planted, write_mode="raw")
    planted.with_name(planted.name + ".json").write_text(json.dumps({
        "source_digest": digest, "beton_digest": ffcv._file_digest(planted), "beton_bytes": planted.stat().st_size,
        "records": 64}))
    argv = train_command(workdir, "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
                         f"config.DATA.TRAIN.DATA_PATHS=[{folder}]", "config.DATA.TRAIN.LOADER=ffcv",
                         "config.DATA.TRAIN.DATA_LIMIT=-1", "config.OPTIMIZER.num_epochs=1",
                         "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=100")
    status, stdout, stderr, peak = run_capped(argv, env=environment(workdir), cwd=workdir)
    text = stdout + stderr
    if status == 0 and "200 training samples" in text and "converting" in text:
        return result(name, "ok", "converted again and trained on the folder's 200 images: "
                      + next(line for line in text.splitlines() if "converting" in line), peak)
    if status == 2 and one_line_error(stderr):
        return result(name, "refused", one_line_error(stderr), peak)
    return result(name, "FAILED", f"exit {status}: {(stderr.strip().splitlines() or [''])[-1]}", peak)


def folder_symlink_loop(workdir: Path) -> dict:
    """A class folder holding two links to `.`: listed once, the links counted (fastssl-train --cfg job lists
    the folder to count its samples; before, it listed the folder for ever: 9.25 GB in 2 minutes)."""
    name = "folder_symlink_loop"
    folder = make_image_folder(workdir / "images", classes=2, per_class=16)
    os.symlink(".", folder / "class0" / "again")
    os.symlink(".", folder / "class0" / "and_again")
    argv = train_command(workdir, "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
                         f"config.DATA.TRAIN.DATA_PATHS=[{folder}]", "config.DATA.TRAIN.DATA_LIMIT=-1", "--cfg", "job")
    status, stdout, stderr, peak = run_capped(argv, env=environment(workdir), cwd=workdir)
    text = stdout + stderr
    if status == 0 and "skipped 2 directory link(s)" in text and "# training samples: 32 " in text:
        return result(name, "skipped", "2 links skipped and counted in one warning; 32 samples listed", peak)
    return result(name, "FAILED", f"exit {status}: {(stderr.strip().splitlines() or [''])[-1]}", peak)


def image_decompression_bomb(workdir: Path) -> dict:
    """A 1.7 kB 16-bit PNG declaring 30000x30000 pixels (5.8 GB when decoded) among 32 images, converted by
    fastssl-convert (two check workers decode in parallel): a counted skip, memory bounded."""
    name = "image_decompression_bomb"
    folder = make_image_folder(workdir / "images", classes=2, per_class=16)
    decompression_bomb_png(folder / "class1" / "bomb.png", side=30000)
    argv = [sys.executable, "-m", "loaders.convert", str(folder), str(workdir / "out.beton"), "--num-workers", "2",
            "--no-progress"]
    status, stdout, stderr, peak = run_capped(argv, env=environment(workdir), cwd=workdir)
    text = stdout + stderr
    if status == 0 and "skipped 1 of 33 files" in text and "bomb.png" in text:
        return result(name, "skipped", "1 of 33 files skipped: "
                      + next(line for line in text.splitlines() if "bomb.png" in line).strip(), peak)
    return result(name, "FAILED", f"exit {status}: {(stderr.strip().splitlines() or [''])[-1]}", peak)


def _too_much(name: str, override: str, key: str) -> callable:
    """A scenario: a config value far beyond any recipe is refused before anything is allocated."""
    def scenario(workdir: Path) -> dict:
        workdir.mkdir(parents=True, exist_ok=True)
        status, _, stderr, peak = run_capped(train_command(workdir, override), env=environment(workdir), cwd=workdir)
        outcome = judge_refusal(name, status, stderr, peak, must_name=key)
        if outcome["outcome"] == "refused" and (workdir / "cache").exists() and any((workdir / "cache").iterdir()):
            return result(name, "FAILED", f"refused, but wrote to the cache first: {outcome['detail']}", peak)
        return outcome

    scenario.__name__ = name
    return scenario


def sigterm_during_set_up(workdir: Path) -> dict:
    """SIGTERM to the process group while the built-in dataset is being generated: the run ends at once
    (exit 143, one line) and leaves no staging folder."""
    name = "sigterm_during_set_up"
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    argv = train_command(workdir, "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=3000", "config.DATA.TRAIN.DATA_LIMIT=-1")
    signalled = {}

    def generating() -> bool:
        if list(cache.glob(".synthetic-*.tmp-*/train/*/*.jpg")):
            signalled["at"] = time.monotonic()
            return True
        return False

    status, _, stderr, peak = run_capped(argv, env=environment(workdir), cwd=workdir, signal_when=generating)
    seconds = time.monotonic() - signalled["at"] if signalled else float("nan")
    left = [p.name for p in cache.iterdir()] if cache.exists() else []
    last = (stderr.strip().splitlines() or [""])[-1]
    if status == 143 and "during set-up" in last and not left and "Traceback" not in stderr:
        return result(name, "refused", f"exited {seconds:.1f} s after SIGTERM, no staging left: {last}", peak)
    return result(name, "FAILED", f"exit {status} {seconds:.1f} s after SIGTERM, left {left}: {last}", peak)


SCENARIOS = [
    _bad_beton("beton_raw_records_claim_1x1", _raw_records_claim_1x1),
    _bad_beton("beton_records_larger_than_claimed", _records_larger_than_claimed),
    _bad_beton("beton_random_bytes", _random_bytes),
    _bad_beton("beton_truncated", _truncated),
    _bad_beton("beton_header_only", _header_only),
    _bad_beton("beton_claims_2^34_samples", _claims_2_to_the_34_samples),
    beton_planted_in_cache,
    folder_symlink_loop,
    image_decompression_bomb,
    _too_much("num_epochs_1e8", "config.OPTIMIZER.num_epochs=100000000", "OPTIMIZER.num_epochs"),
    _too_much("queue_length_1e7", "config.LOSS.swav_loss.queue.queue_length=10000000", "queue_length"),
    _too_much("image_size_20000", "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=20000", "IMAGE_SIZE"),
    _too_much("train_per_class_1e7", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=10000000", "TRAIN_PER_CLASS"),
    sigterm_during_set_up,
]


# ---------------- the command ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where the crafted inputs and runs go (default: a temporary folder)")
    parser.add_argument("--only", help="comma-separated scenario names")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.__name__ in args.only.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastssl-attacks-data-"))
    results = []
    for scenario in chosen:
        start = time.perf_counter()
        outcome = scenario(workdir / scenario.__name__.replace("^", ""))
        outcome["seconds"] = round(time.perf_counter() - start, 1)
        results.append(outcome)
        print(f"{outcome['name']:<36} {outcome['outcome']:<8} {_mb(outcome['peak_rss_mb']):>8} "
              f"{outcome['seconds']:>6.1f}s  {outcome['detail']}", flush=True)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "attacks_data", "machine": platform.node(), "cpus": os.cpu_count(),
                      "commit": commit, "command": " ".join(["python -m benchmarks.attacks_data", *argv]),
                      "address_space_cap_bytes": ADDRESS_SPACE_CAP, "results": results}))
    return 0 if all(r["outcome"] != "FAILED" for r in results) else 1


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
