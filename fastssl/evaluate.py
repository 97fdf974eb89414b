"""fastssl-eval: k-nearest-neighbour and linear evaluation of a trunk's features, for any checkpoint.

    fastssl-eval knn --checkpoint checkpoints/swav_1node_cpu_resnet18 [--k 20] [--baselines]
    fastssl-eval linear --checkpoint checkpoints/swav_1node_cpu_resnet18 [--epochs 10] [--random-trunk]
    fastssl-eval neighbours --checkpoint checkpoints/swav_1node_cpu_resnet18   # <run>/neighbours.png

Features are the pooled trunk output, L2-normalised; each held-out image votes with its k nearest
training images weighted by exp(similarity / T) (the weighted kNN of Wu et al. 2018, T = 0.07).
With --baselines the same figure is printed for a randomly initialised trunk of the same
architecture, with BatchNorm statistics as initialised and re-estimated on the training images.
The built-in dataset's held-out split is 50 images a class: top-1 on 500 images has a standard error of
about 2.2 points, too coarse to tell settings apart. ``--val-per-class N`` evaluates on N a class of the
same generator (the configured split is its first images), kept in the cache beside the run's dataset.

``linear`` composes a fastssl-train run (benchmark/linear_image_classification/...) that trains a linear
classifier on the checkpoint's frozen trunk (MODEL.WEIGHTS_INIT) over the checkpoint's training data, and
prints its held-out top-1 and top-5; further ``config.KEY=value`` arguments are passed on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loaders.sources import resolve_image_folder

from . import train
from .builder import config_from_checkpoint
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .config import ConfigError
from .plot import plot_neighbours
from .metrics import read_records
from .run_data import build_eval_data, data_source, synthetic_params
from .run_model import build_run_model, linear_eval_arguments


@torch.no_grad()
def extract_features(trunk: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled, L2-normalised features (N, C) and labels (N,) over one pass of ``loader``."""
    trunk.eval()
    features, labels = [], []
    for batch in loader:
        features.append(F.normalize(trunk(batch.crops[0]).float(), dim=1))
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_correct(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                test_labels: torch.Tensor, *, k: int, temperature: float, chunk: int = 1024) -> int:
    """How many test rows the weighted kNN classifier labels right. Features: (N, C) unit-norm."""
    num_classes = int(train_labels.max()) + 1
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start:start + chunk] @ train_features.t()  # (b, N_train)
        top_similarity, top_index = similarity.topk(min(k, train_features.shape[0]), dim=1)
        weights = (top_similarity / temperature).exp()  # (b, k)
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        correct += int((votes.argmax(dim=1) == test_labels[start:start + chunk]).sum())
    return correct


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, *, k: int, temperature: float) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier. Features: (N, C) unit-norm."""
    return 100.0 * knn_correct(train_features, train_labels, test_features, test_labels, k=k,
                               temperature=temperature) / test_features.shape[0]


@torch.no_grad()
def reestimate_batchnorm(trunk: nn.Module, loader) -> None:
    """Replace BatchNorm running statistics with their exact average over one pass of ``loader``."""
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: the plain mean over the pass
    trunk.train()
    for batch in loader:
        trunk(batch.crops[0])
    trunk.eval()


def knn_report(*, trunk_builder, trained_state: dict | None, train_loader, val_loader, k: int, temperature: float,
               baselines: bool, device: torch.device) -> dict:
    """kNN top-1 of the trained trunk and, optionally, of a random trunk (BN as initialised / re-estimated)."""
    report = {}
    if trained_state is not None:
        model = trunk_builder().to(device)
        model.load_state_dict(trained_state)
        report["trained"] = knn_top1(*extract_features(model.trunk, train_loader),
                                     *extract_features(model.trunk, val_loader), k=k, temperature=temperature)
    if baselines:
        torch.manual_seed(0)
        model = trunk_builder().to(device)
        report["random_bn_init"] = knn_top1(*extract_features(model.trunk, train_loader),
                                            *extract_features(model.trunk, val_loader), k=k, temperature=temperature)
        reestimate_batchnorm(model.trunk, train_loader)
        report["random_bn_reestimated"] = knn_top1(*extract_features(model.trunk, train_loader),
                                                   *extract_features(model.trunk, val_loader), k=k,
                                                   temperature=temperature)
    return report


def held_out_folder(cfg, *, val_path: str | None, val_per_class: int) -> str | None:
    """The held-out image folder of the commands: ``val_path``; with ``val_per_class`` the built-in dataset's
    held-out split at that many images a class; None: the run's own (the built-in split as configured)."""
    if not val_per_class:
        return val_path
    source, train_path = data_source(cfg)
    if val_path is not None or source != "synthetic":
        raise ValueError("--val-per-class takes the built-in dataset's held-out split; "
                         + ("not with --val-path" if val_path else f"this run trains on {train_path}"))
    larger = {**synthetic_params(cfg), "val_per_class": val_per_class}  # beside the run's, in its own folder
    return str(resolve_image_folder(source="synthetic", data_path=None, split="val", synthetic_params=larger))


def _checkpoint_file(path: str) -> Path | None:
    """A checkpoint file, or a run directory's latest checkpoint; None (after an error line) when there is none."""
    path = Path(path)
    found = latest_checkpoint(path) if path.is_dir() else path
    if found is None or not found.exists():
        print(f"fastssl-eval: error: no checkpoint found at {path}", file=sys.stderr)
        return None
    return found


def _knn_command(args) -> int:
    checkpoint_file = _checkpoint_file(args.checkpoint)
    if checkpoint_file is None:
        return 2
    try:
        saved = load_checkpoint(checkpoint_file)
        missing = [key for key in ("model", "config", "head_params", "step") if key not in saved]
        if missing:
            raise CheckpointError(f"{checkpoint_file} is not a fastssl training checkpoint "
                                  f"(it has no {missing[0]!r})")
        cfg = config_from_checkpoint(saved)
    except (CheckpointError, ConfigError) as error:
        print(f"fastssl-eval: error: {error}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")

    def trunk_builder():
        return build_run_model(cfg, head_params=saved["head_params"])

    common = dict(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers, device=device)
    try:
        val_path = held_out_folder(cfg, val_path=args.val_path, val_per_class=args.val_per_class)
        train_loader = build_eval_data(cfg, split="train", data_path=args.train_path, **common)
        val_loader = build_eval_data(cfg, split="val", data_path=val_path, **common)
    except (FileNotFoundError, ValueError) as error:
        print(f"fastssl-eval: error: {error}", file=sys.stderr)
        return 2
    report = knn_report(trunk_builder=trunk_builder, trained_state=saved["model"], train_loader=train_loader,
                        val_loader=val_loader, k=args.k, temperature=args.temperature, baselines=args.baselines,
                        device=device)
    print(f"kNN top-1 (k={args.k}) on the held-out split, checkpoint {checkpoint_file} (step {saved['step']}):")
    names = {"trained": "learned trunk", "random_bn_init": "random trunk, BN as initialised",
             "random_bn_reestimated": "random trunk, BN re-estimated on train"}
    for key, value in report.items():
        print(f"  {names[key]:<40} {value:6.2f}%")
    print(json.dumps({"knn_top1": report, "k": args.k, "checkpoint": str(checkpoint_file), "step": saved["step"],
                      "val_path": val_path}))
    return 0


NEIGHBOURS_SOFTWARE = "fastssl-eval neighbours"


def _pixels(dataset, index: int):
    """The centre crop the trunk saw, as an (H, W, 3) array in [0, 1]."""
    crop = dataset[(index, 0)][0][0]  # (3, H, W), normalised
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    return (crop * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def neighbour_rows(train_loader, val_loader, *, train_features: torch.Tensor, val_features: torch.Tensor,
                   num_queries: int, num_neighbours: int) -> list[dict]:
    """``num_queries`` held-out images evenly spaced over the split (a class-sorted folder: every class) and
    their nearest training images by cosine similarity of the features, with class names where there are."""
    train_set, val_set = train_loader.loader.dataset, val_loader.loader.dataset
    train_index, val_index = list(train_loader.shard), list(val_loader.shard)  # feature row -> dataset index

    def label(dataset, index):
        classes, value = dataset.files.classes, dataset.files.labels[index]
        return classes[value] if classes and value >= 0 else None

    positions = torch.linspace(0, len(val_index) - 1, min(num_queries, len(val_index))).round().long().tolist()
    similarity = val_features[positions] @ train_features.t()  # (queries, N_train)
    top_similarity, top_row = similarity.topk(min(num_neighbours, train_features.shape[0]), dim=1)
    rows = []
    for position, similarities, neighbours in zip(positions, top_similarity.tolist(), top_row.tolist()):
        query = val_index[position]
        rows.append({"image": _pixels(val_set, query), "label": label(val_set, query),
                     "neighbours": [(_pixels(train_set, train_index[row]), label(train_set, train_index[row]), value)
                                    for row, value in zip(neighbours, similarities)]})
    return rows


def _neighbours_command(args) -> int:
    checkpoint_file = _checkpoint_file(args.checkpoint)
    if checkpoint_file is None:
        return 2
    saved = load_checkpoint(checkpoint_file)
    cfg = config_from_checkpoint(saved)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    output = Path(args.output or checkpoint_file.parent / "neighbours.png")
    common = dict(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers, device=device)
    try:
        val_path = held_out_folder(cfg, val_path=args.val_path, val_per_class=0)
        train_loader = build_eval_data(cfg, split="train", data_path=args.train_path, max_samples=args.bank_size,
                                       **common)
        val_loader = build_eval_data(cfg, split="val", data_path=val_path, **common)
    except (FileNotFoundError, ValueError) as error:
        print(f"fastssl-eval: error: {error}", file=sys.stderr)
        return 2
    model = build_run_model(cfg, head_params=saved["head_params"]).to(device)
    model.load_state_dict(saved["model"])
    train_features, _ = extract_features(model.trunk, train_loader)
    val_features, _ = extract_features(model.trunk, val_loader)
    rows = neighbour_rows(train_loader, val_loader, train_features=train_features.cpu(),
                          val_features=val_features.cpu(), num_queries=args.queries, num_neighbours=args.neighbours)
    title = (f"nearest training images (of {len(train_loader.shard)}) in the trunk's feature space, "
             f"{checkpoint_file.parent.name} step {saved['step']}")
    try:
        plot_neighbours(rows, output, title=title, software=NEIGHBOURS_SOFTWARE)
    except FileExistsError as error:
        print(f"fastssl-eval: error: {error}", file=sys.stderr)
        return 2
    matches = [row["label"] == neighbour[1] for row in rows for neighbour in row["neighbours"] if row["label"]]
    shown = f"; {sum(matches)} of {len(matches)} neighbours share the query's class" if matches else ""
    print(f"fastssl-eval: wrote {output}: {len(rows)} held-out images and their {args.neighbours} nearest training "
          f"images{shown}")
    return 0


def final_metrics(directory: Path) -> dict | None:
    """The last end-of-training record of a run's metrics.jsonl (fastssl/metrics.py, log_final)."""
    records, _ = read_records(directory / "metrics.jsonl")
    ends = [record for record in records if record.get("phase") == "end"]
    return ends[-1] if ends else None


def _linear_command(args, overrides: list[str]) -> int:
    checkpoint_file = _checkpoint_file(args.checkpoint)
    if checkpoint_file is None:
        return 2
    run_dir = checkpoint_file.parent
    output = Path(args.output or run_dir / ("linear_eval_random" if args.random_trunk else "linear_eval"))
    try:
        cfg = config_from_checkpoint(load_checkpoint(checkpoint_file))
        test_path = held_out_folder(cfg, val_path=args.val_path, val_per_class=args.val_per_class)
        arguments = linear_eval_arguments(cfg, weights_file=None if args.random_trunk else str(checkpoint_file),
                                          output_dir=str(output), test_path=test_path)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"fastssl-eval: error: {error}", file=sys.stderr)
        return 2
    arguments += [f"config.OPTIMIZER.num_epochs={args.epochs}"] if args.epochs else []
    arguments += ["config.MACHINE.DEVICE=cpu"] if args.cpu else []
    status = train.main(arguments + overrides)
    metrics = final_metrics(output) if status == 0 else None
    if metrics is None:
        return status or 1
    trunk = "random trunk" if args.random_trunk else f"trunk of {checkpoint_file}"
    accuracy = {key: value for key, value in metrics.items() if key.startswith("top")}  # top1, top5 (per head)
    shown = ", ".join(f"{key.replace('top', 'top-')} {value:.2f}%" for key, value in accuracy.items())
    print(f"linear evaluation ({trunk}): {shown} on {metrics['test_images']} held-out images; run in {output}")
    print(json.dumps({"linear": accuracy, "test_images": metrics["test_images"], "checkpoint": str(checkpoint_file),
                      "random_trunk": args.random_trunk, "run": str(output)}))
    return 0


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _positive_finite(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


_positive_finite.__name__ = "number"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    knn = commands.add_parser("knn", help="weighted kNN top-1 of the trunk features")
    knn.add_argument("--checkpoint", required=True, help="a checkpoint file or a checkpoint directory (latest)")
    knn.add_argument("--k", type=_at_least(1), default=20)
    knn.add_argument("--temperature", type=_positive_finite, default=0.07)
    knn.add_argument("--baselines", action="store_true", help="also evaluate a randomly initialised trunk")
    knn.add_argument("--image-size", type=_at_least(0), default=0,
                     help="evaluation resolution (default: the large crop)")
    knn.add_argument("--train-path", default=None, help="ImageFolder of training images (default: from the run)")
    knn.add_argument("--val-path", default=None, help="ImageFolder of held-out images (synthetic: built in)")
    knn.add_argument("--val-per-class", type=_at_least(0), default=0,
                     help="built-in dataset: N held-out images a class (default: the run's split, 50)")
    knn.add_argument("--batch-size", type=_at_least(1), default=256)
    knn.add_argument("--workers", type=_at_least(0), default=2)
    knn.add_argument("--cpu", action="store_true")
    linear = commands.add_parser("linear", help="train a linear classifier on the frozen trunk (a fastssl-train run)")
    linear.add_argument("--checkpoint", required=True, help="a checkpoint file or a checkpoint directory (latest)")
    linear.add_argument("--epochs", type=_at_least(0), default=0, help="classifier epochs (default: the protocol's)")
    linear.add_argument("--random-trunk", action="store_true", help="the same architecture, randomly initialised")
    linear.add_argument("--val-path", default=None, help="ImageFolder of held-out images (synthetic: built in)")
    linear.add_argument("--val-per-class", type=_at_least(0), default=0,
                        help="built-in dataset: N held-out images a class (default: the run's split, 50)")
    linear.add_argument("--output", default=None, help="the run's directory (default: <run>/linear_eval[_random])")
    linear.add_argument("--cpu", action="store_true")
    neighbours = commands.add_parser("neighbours", help="a PNG grid of held-out images and their nearest training "
                                                        "images in the trunk's feature space")
    neighbours.add_argument("--checkpoint", required=True, help="a checkpoint file or a checkpoint directory (latest)")
    neighbours.add_argument("--output", default=None, help="the PNG (default: <run>/neighbours.png)")
    neighbours.add_argument("--queries", type=int, default=12, help="held-out images, evenly spaced over the split")
    neighbours.add_argument("--neighbours", type=int, default=6)
    neighbours.add_argument("--bank-size", type=int, default=0,
                            help="training images searched, evenly spaced (default: all)")
    neighbours.add_argument("--image-size", type=int, default=0, help="evaluation resolution (default: the large crop)")
    neighbours.add_argument("--train-path", default=None, help="ImageFolder of training images (default: the run's)")
    neighbours.add_argument("--val-path", default=None, help="ImageFolder of held-out images (default: the run's)")
    neighbours.add_argument("--batch-size", type=int, default=256)
    neighbours.add_argument("--workers", type=int, default=2)
    neighbours.add_argument("--cpu", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    unknown = [word for word in overrides if not word.startswith("config.")]
    if unknown or (overrides and args.command != "linear"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if args.command == "neighbours":
        return _neighbours_command(args)
    return _linear_command(args, overrides) if args.command == "linear" else _knn_command(args)


if __name__ == "__main__":
    sys.exit(main())
