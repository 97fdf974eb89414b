"""Loader throughput: every available backend against the classic baseline, side by side.

    python -m benchmarks.loader                  # 2000 photographs, SwAV's 2x224 + 6x96 recipe
    python -m benchmarks.loader --quick          # seconds: tiny images and crops (the smoke test)

The baseline is the classic design (SwAV's MultiCropDataset): a torch DataLoader over an
image folder whose dataset decodes each image with PIL and runs one torchvision transform
pipeline per crop (RandomResizedCrop, flip, ColorJitter/RandomGrayscale, PIL's GaussianBlur,
ToTensor, Normalize). Every backend reads the same JPEGs with the same worker count, batch
size and crop recipe, and is timed over the same number of batches after a warm-up, the crops
landing on the training device in the training dtype. FFCV's one-off conversion to a .beton
(JPEG records, so it also decodes JPEG) is not timed. Prints a table and one JSON line, with
each backend's CPU time per image by thread (and DataLoader worker process) and the cores it
used: on a busy machine, CPU per image compares backends more steadily than images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from benchmarks.make_bench_data import ensure_bench_data
from loaders.recipe import MultiCropRecipe, recipe_from_transforms

SWAV_TRANSFORMS = [
    {"name": "ImgPilToMultiCrop", "total_num_crops": 8, "size_crops": [224, 96], "num_crops": [2, 6],
     "crop_scales": [[0.14, 1.0], [0.05, 0.14]]},
    {"name": "RandomHorizontalFlip", "p": 0.5},
    {"name": "ImgPilColorDistortion", "strength": 1.0},
    {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
    {"name": "ToTensor"},
    {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
]
BACKENDS = ("baseline", "torchvision", "dali", "ffcv")


class _PilGaussianBlur:
    """SwAV's PILRandomGaussianBlur: PIL's blur with a uniform radius, applied with probability p."""

    def __init__(self, p: float, radius: tuple[float, float]):
        self.p, self.radius = p, radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class SwAVMultiCropDataset(torch.utils.data.Dataset):
    """The classic baseline: PIL decode, then one torchvision pipeline per crop (SwAV's design)."""

    def __init__(self, paths: list[str], recipe: MultiCropRecipe):
        self.paths = paths
        self.transforms = []
        for size, group, augmentation in zip(recipe.crop_sizes, recipe.crop_groups, recipe.augmentations):
            steps = [T.RandomResizedCrop(size, scale=recipe.crop_scales[group], ratio=recipe.crop_ratio),
                     T.RandomHorizontalFlip(augmentation.flip_p)]
            if augmentation.distorts_colour:
                jitter = T.ColorJitter(augmentation.brightness, augmentation.contrast, augmentation.saturation,
                                       augmentation.hue)
                steps += [T.RandomApply([jitter], p=augmentation.jitter_p), T.RandomGrayscale(augmentation.gray_p)]
            steps += [_PilGaussianBlur(augmentation.blur_p, augmentation.blur_sigma),
                      T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
            self.transforms.append(T.Compose(steps))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
        return [transform(image) for transform in self.transforms], index


def _baseline_batches(*, data: Path, recipe: MultiCropRecipe, batch_size: int, num_workers: int,
                      device: torch.device, dtype: torch.dtype):
    from loaders.images import list_samples

    dataset = SwAVMultiCropDataset(list_samples(data, data_limit=-1).paths, recipe)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         drop_last=True, persistent_workers=num_workers > 0,
                                         pin_memory=device.type == "cuda")
    while True:
        for crops, _ in loader:
            yield [crop.to(device, non_blocking=True).to(dtype).contiguous(memory_format=torch.channels_last)
                   for crop in crops]


def _backend_batches(backend: str, *, data: Path, recipe: MultiCropRecipe, batch_size: int, num_workers: int,
                     device: torch.device, dtype: torch.dtype, scratch: Path):
    common = dict(backend=backend, recipe=recipe, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                  data_limit=-1, seed=0, rank=0, world_size=1, device=device, dtype=dtype, synthetic_params=None)
    if backend == "torchvision":
        from loaders.build import build_train_loader

        loader = build_train_loader(source="disk_folder", data_path=str(data), **common)
    elif backend == "dali":
        from loaders.dali import build_dali_loader

        loader = build_dali_loader(source="disk_folder", data_path=str(data), **common)
    else:
        from loaders.beton import convert_image_folder
        from loaders.ffcv import build_ffcv_loader

        beton = scratch / f"{data.name}-jpg.beton"
        if not beton.exists():
            convert_image_folder(data, beton, max_resolution=512, write_mode="jpg", jpeg_quality=90,
                                 compress_probability=1.0, num_workers=num_workers, progress=False)
        loader = build_ffcv_loader(source="ffcv", data_path=str(beton), **common)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.crops
        epoch += 1


def available_backends() -> list[str]:
    found = ["baseline", "torchvision"]
    for backend, module in (("dali", "nvidia.dali"), ("ffcv", "ffcv")):
        try:
            __import__(module)
            found.append(backend)
        except ImportError:
            pass
    return found


def time_backend(batches, *, warmup: int, timed: int, batch_size: int, device: torch.device
                 ) -> tuple[float, dict[str, float]]:
    """Images per second over `timed` batches after `warmup` batches, and this process's CPU
    time per image over them by thread (see _thread_cpu_seconds) plus the cores it used."""
    for _ in range(warmup):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: timing boundary
    cpu_before, start = _thread_cpu_seconds(), time.perf_counter()
    for _ in range(timed):
        crops = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: timing boundary
    elapsed = time.perf_counter() - start
    cpu = {kind: seconds - cpu_before.get(kind, 0.0) for kind, seconds in _thread_cpu_seconds().items()}
    assert crops[0].shape[0] == batch_size
    images = timed * batch_size
    breakdown = {f"{kind}_ms_per_image": round(1000 * seconds / images, 2) for kind, seconds in cpu.items()}
    return images / elapsed, {**breakdown, "cores": round(sum(cpu.values()) / elapsed, 2)}


def _thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process's threads and its child processes (Linux /proc; {}
    elsewhere), grouped as 'augment' (DeviceMultiCrop's CPU threads), 'main', 'other' (decoders'
    and pipelines' threads) and 'workers' (child processes: the DataLoader workers)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    seconds: dict[str, float] = {}

    def add(kind: str, stat: Path) -> None:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            return
        seconds[kind] = seconds.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    for task in Path("/proc/self/task").glob("*"):
        name = names.get(int(task.name), "")
        add("augment" if name.startswith("multicrop") else "main" if name == "MainThread" else "other",
            task / "stat")
        try:
            children = (task / "children").read_text().split()
        except OSError:
            children = []
        for child in children:
            add("workers", Path("/proc") / child / "stat")  # the whole process, all its threads
    return seconds


def _machine() -> dict:
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastssl-bench loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder (default: benchmark photographs made in the cache)")
    parser.add_argument("--num-images", type=int, default=2000, help="size of the generated benchmark data")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated; missing ones are skipped")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=10, help="timed batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quick", action="store_true", help="tiny data, crops and batches (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.warmup, args.batches = 48, 8, 1, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table and the JSON line; return the JSON record."""
    args = _parse_args(argv)
    transforms = SWAV_TRANSFORMS
    long_side = 500
    if args.quick:
        transforms = [dict(SWAV_TRANSFORMS[0], size_crops=[32, 16]), *SWAV_TRANSFORMS[1:]]
        long_side = 64
    recipe = recipe_from_transforms(transforms)
    data = Path(args.data) if args.data else ensure_bench_data(None, num_images=args.num_images, long_side=long_side)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    scratch = Path(os.environ.get("FASTSSL_CACHE") or Path.home() / ".cache" / "fastssl")
    requested = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(requested) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"fastssl-bench loader: unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    installed = available_backends()
    backends = ["baseline"] + [b for b in requested if b in installed and b != "baseline"]
    skipped = [b for b in requested if b not in installed]

    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    figures: dict[str, float] = {}
    cpu: dict[str, dict[str, float]] = {}
    for backend in backends:
        kwargs = dict(data=data, recipe=recipe, batch_size=args.batch_size, num_workers=args.workers,
                      device=device, dtype=dtype)
        batches = (_baseline_batches(**kwargs) if backend == "baseline"
                   else _backend_batches(backend, scratch=scratch, **kwargs))
        figures[backend], cpu[backend] = time_backend(batches, warmup=args.warmup, timed=args.batches,
                                                      batch_size=args.batch_size, device=device)
        batches.close()  # ends DataLoader workers / pipelines before the next backend runs
    ratios = {backend: value / figures["baseline"] for backend, value in figures.items()}

    crops = "+".join(f"{n}x{s}" for n, s in zip(recipe.num_crops, recipe.size_crops))
    print(f"\nloader throughput, {crops} crops, {args.workers} workers, batch {args.batch_size}, "
          f"{args.batches} timed batches, device {device}, {args.dtype}, data {data}")
    print(f"1-min load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"{'backend':<12} {'images/s':>10} {'x baseline':>11}   CPU ms/image by thread or process; cores used")
    for backend in figures:
        threads = ", ".join(f"{k.removesuffix('_ms_per_image')} {v}" for k, v in cpu[backend].items() if k != "cores")
        print(f"{backend:<12} {figures[backend]:>10.1f} {ratios[backend]:>11.2f}   {threads}; {cpu[backend]['cores']}")
    if skipped:
        print(f"not installed: {', '.join(skipped)}")
    record = {
        "benchmark": "loader", "machine": _machine(), "commit": _commit(),
        "command": " ".join(["python -m benchmarks.loader", *(sys.argv[1:] if argv is None else argv)]),
        "figures": {"images_per_s": {k: round(v, 2) for k, v in figures.items()},
                    "ratio_to_baseline": {k: round(v, 3) for k, v in ratios.items()},
                    "process_cpu": cpu,
                    "crops": crops, "batch_size": args.batch_size, "workers": args.workers,
                    "timed_batches": args.batches, "device": str(device), "dtype": args.dtype,
                    "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
