"""fastssl-bench learn: does a recipe learn, on every loader backend? Trained trunks against random ones.

    fastssl-bench learn                                     # every method's CPU recipe, torchvision, Fashion-MNIST
    fastssl-bench learn --configs pretrain/swav/swav_1node_cpu_resnet18 --loaders torchvision,ffcv,dali --seeds 3
    fastssl-bench learn --configs pretrain/swav/swav_1node_cpu_resnet18 --epochs 2 config.KEY=value ...

For each config, loader backend (DATA.TRAIN.LOADER) and seed (SEED_VALUE 0..N-1) it trains with the real
``fastssl-train`` in a subprocess, on the dataset named by ``--dataset`` (default ``fashion_mnist``: 60,000
training images, the 10,000 test images held out; ``synthetic``: the built-in set), for the recipe's own
budget or ``--epochs``. Then, in this process, the trunk's pooled, L2-normalised features of every training
and held-out image (one centre crop, as ``fastssl-eval knn``) give

- kNN top-1: weighted k = 20, T = 0.07 (Wu et al. 2018), every training image a neighbour candidate;
- linear top-1: a multinomial logistic regression on the frozen, standardised features (full-batch L-BFGS,
  no augmentation: a probe of what the features separate, cheaper than ``fastssl-eval linear``'s run);

for the trained trunk and for a random trunk of the same architecture initialised with the same seed,
with BatchNorm statistics as initialised and re-estimated on the training images. A row gives the mean and
spread (sample standard deviation, min-max) over the seeds, the training wall time and the mean images/s
of the runs (from their metrics.jsonl). Runs live in ``--out`` (default /tmp/fastssl-learn); run again, a
finished run (same config, loader, seed, epochs and overrides) is evaluated again without training. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernels import git_commit, machine

CPU_RECIPES = ["pretrain/swav/swav_1node_cpu_resnet18", "pretrain/deepcluster_v2/deepclusterv2_1node_cpu_resnet18",
               "pretrain/npid/npid_1node_cpu_resnet18", "pretrain/byol/byol_1node_cpu_resnet18",
               "pretrain/rotnet/rotnet_1node_cpu_resnet18"]
LOADERS = ("torchvision", "ffcv", "dali")
DATASETS = ("fashion_mnist", "synthetic")


def train_run(config: str, *, loader: str, seed: int, dataset: str, epochs: int, run_dir: Path,
              overrides: list[str]) -> dict:
    """Train one run with fastssl-train (resuming a run already there); its wall time and mean images/s."""
    arguments = [f"config={config}", f"config.DATA.TRAIN.DATA_SOURCES=[{dataset}]", "config.DATA.TRAIN.DATA_PATHS=[]",
                 f"config.DATA.TRAIN.LOADER={loader}", f"config.SEED_VALUE={seed}", f"config.CHECKPOINT.DIR={run_dir}",
                 "config.CHECKPOINT.AUTO_RESUME=True", *([f"config.OPTIMIZER.num_epochs={epochs}"] if epochs else []),
                 *overrides]
    environ = {**os.environ, "PYTHONSAFEPATH": "1"}  # never import from the working directory
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fastssl.train", *arguments], env=environ, capture_output=True,
                            text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"fastssl-train {config} ({loader}, seed {seed}) exited {result.returncode}: {last}")
    records = _records(run_dir / "metrics.jsonl")
    speeds = [record["images_per_s"] for record in records if "images_per_s" in record]
    timed = _timed_wall(run_dir)
    return {"wall_s": timed if timed is not None else wall, "images_per_s": statistics.fmean(speeds) if speeds else None}


def _records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: skipped
    return records


def _timed_wall(run_dir: Path) -> float | None:
    """The training wall time recorded by the first run of run_dir (a later re-evaluation does not retrain)."""
    try:
        return float(json.loads((run_dir / "learn_wall.json").read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@torch.no_grad()
def features_of(trunk, loader) -> tuple[torch.Tensor, torch.Tensor]:
    from fastssl.evaluate import extract_features

    return extract_features(trunk, loader)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 weight_decay: float = 1e-4, iterations: int = 100) -> float:
    """Top-1 (%) of a multinomial logistic regression on standardised features, full-batch L-BFGS."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(train_y.max()) + 1
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return 100.0 * float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def evaluate_trunks(run_dir: Path, *, seed: int, k: int, temperature: float, baselines: bool,
                    batch_size: int = 256, workers: int = 2) -> dict:
    """kNN and linear top-1 of the run's trained trunk and (baselines) of random trunks initialised with seed."""
    from fastssl.builder import config_from_checkpoint
    from fastssl.checkpoint import latest_checkpoint, load_checkpoint
    from fastssl.evaluate import knn_top1, reestimate_batchnorm
    from fastssl.run_data import build_eval_data
    from fastssl.run_model import build_run_model

    saved = load_checkpoint(latest_checkpoint(run_dir))
    cfg = config_from_checkpoint(saved)
    device = torch.device("cpu")
    common = dict(image_size=0, batch_size=batch_size, num_workers=workers, device=device, data_path=None)
    train_loader = build_eval_data(cfg, split="train", **common)
    test_loader = build_eval_data(cfg, split="val", **common)

    def scores(trunk) -> dict:
        train_x, train_y = features_of(trunk, train_loader)
        test_x, test_y = features_of(trunk, test_loader)
        return {"knn": knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=temperature),
                "linear": linear_probe(train_x, train_y, test_x, test_y), "test_images": int(test_y.numel())}

    model = build_run_model(cfg, head_params=saved["head_params"])
    model.load_state_dict(saved["model"])
    report = {"trained": scores(model.trunk), "step": int(saved["step"])}
    if baselines:
        torch.manual_seed(seed)
        model = build_run_model(cfg, head_params=saved["head_params"])
        report["random_bn_init"] = scores(model.trunk)
        reestimate_batchnorm(model.trunk, train_loader)
        report["random_bn_reestimated"] = scores(model.trunk)
    return report


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def main(argv: list[str] | None = None) -> dict | int:
    parser = argparse.ArgumentParser(prog="fastssl-bench learn", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CPU_RECIPES), help="comma-separated config names")
    parser.add_argument("--loaders", default="torchvision", help="comma-separated: torchvision, ffcv, dali")
    parser.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=1, help="SEED_VALUE 0..N-1")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: each recipe's own)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--no-baselines", action="store_true", help="skip the random trunks")
    parser.add_argument("--out", default="/tmp/fastssl-learn", help="where the runs live")
    args, overrides = parser.parse_known_args(argv)
    unknown = [word for word in overrides if not word.startswith("config.")]
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    bad = [name for name in loaders if name not in LOADERS]
    if unknown or bad or args.seeds < 1 or args.k < 1 or not args.temperature > 0 or args.epochs < 0:
        parser.error(f"bad arguments: {' '.join(unknown or bad) or 'seeds, k, temperature and epochs must be positive'}")
    rows = []
    for config in [name.strip() for name in args.configs.split(",") if name.strip()]:
        for loader in loaders:
            rows.append(_measure(config, loader=loader, args=args, overrides=overrides))
            print(_table_line(rows[-1]), flush=True)
    result = {"benchmark": "learn", "dataset": args.dataset, "seeds": args.seeds, "epochs": args.epochs or "recipe",
              "overrides": overrides, "rows": rows, "commit": git_commit(), "machine": machine(torch.device("cpu"))}
    print(TABLE_HEADER)
    for row in rows:
        print(_table_line(row))
    print(json.dumps(result))
    return 0 if all("error" not in row for row in rows) else 1


def _measure(config: str, *, loader: str, args, overrides: list[str]) -> dict:
    row = {"config": config, "loader": loader}
    per_seed = []
    # Runs with other overrides or epochs are other runs: their folder is keyed by them.
    variant = hashlib.sha256(json.dumps([args.epochs, overrides]).encode()).hexdigest()[:10]
    for seed in range(args.seeds):
        run_dir = Path(args.out) / args.dataset / config.replace("/", "_") / loader / variant / f"seed{seed}"
        try:
            if not (run_dir / "learn_wall.json").exists():
                timing = train_run(config, loader=loader, seed=seed, dataset=args.dataset, epochs=args.epochs,
                                   run_dir=run_dir, overrides=overrides)
                (run_dir / "learn_wall.json").write_text(json.dumps(timing))
            else:
                timing = json.loads((run_dir / "learn_wall.json").read_text())
            scores = evaluate_trunks(run_dir, seed=seed, k=args.k, temperature=args.temperature,
                                     baselines=not args.no_baselines)
        except (RuntimeError, OSError, ValueError) as error:
            row["error"] = str(error).splitlines()[0]
            return row
        per_seed.append({"seed": seed, **timing, **scores})
    row["runs"] = per_seed
    row["steps"] = per_seed[0]["step"]
    for key in ("trained", "random_bn_init", "random_bn_reestimated"):
        if key in per_seed[0]:
            row[key] = {metric: _spread([run[key][metric] for run in per_seed]) for metric in ("knn", "linear")}
    row["test_images"] = per_seed[0]["trained"]["test_images"]
    row["wall_s"] = statistics.fmean(run["wall_s"] for run in per_seed)
    speeds = [run["images_per_s"] for run in per_seed if run["images_per_s"]]
    row["images_per_s"] = statistics.fmean(speeds) if speeds else None
    if "random_bn_init" in row:
        best_random = max(row["random_bn_init"]["knn"]["mean"], row["random_bn_reestimated"]["knn"]["mean"])
        row["knn_margin"] = row["trained"]["knn"]["mean"] - best_random
    return row


TABLE_HEADER = (f"{'config':<44}{'loader':<12}{'steps':>6}{'kNN (mean ± sd)':>18}{'linear':>9}{'random kNN':>16}"
                f"{'random lin.':>14}{'margin':>8}{'wall s':>8}{'img/s':>7}")


def _table_line(row: dict) -> str:
    name = row["config"].split("/")[-1]
    if "error" in row:
        return f"{name:<44}{row['loader']:<12} error: {row['error']}"
    trained = row["trained"]
    random_knn = random_linear = margin = "-"
    if "random_bn_init" in row:
        init, reest = row["random_bn_init"], row["random_bn_reestimated"]
        random_knn = f"{init['knn']['mean']:.2f}/{reest['knn']['mean']:.2f}"
        random_linear = f"{init['linear']['mean']:.2f}/{reest['linear']['mean']:.2f}"
        margin = f"{row['knn_margin']:+.2f}"
    speed = f"{row['images_per_s']:.1f}" if row["images_per_s"] else "-"
    return (f"{name:<44}{row['loader']:<12}{row['steps']:>6}"
            f"{trained['knn']['mean']:>11.2f} ± {trained['knn']['std']:<4.2f}{trained['linear']['mean']:>9.2f}"
            f"{random_knn:>16}{random_linear:>14}{margin:>8}{row['wall_s']:>8.0f}{speed:>7}")


if __name__ == "__main__":
    sys.exit(main())
