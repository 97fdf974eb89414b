"""fastssl-plot: one PNG of a run's curves (loss, learning rate, images/s and data-wait share, kNN top-1 and
embedding rank against step) from its metrics.jsonl; several runs, or every run under a sweep directory,
overlaid with a legend.

    fastssl-plot checkpoints/swav_1node_cpu_resnet18            # writes checkpoints/swav_1node_cpu_resnet18/curves.png
    fastssl-plot multirun/2026-12-07/10-00-00 --output sweep.png # every run below the sweep directory
    fastssl-plot RUN_A RUN_B --output compare.png

Training writes the same figure into its run directory at the end. A PNG is written only where there is none
or where the one there was written by fastssl-plot (its "Software" text says so).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

SOFTWARE = "fastssl-plot"
CURVES_FILE = "curves.png"
# (panel title, record key(s) and line style, y label): the keys of metrics.jsonl (fastssl/metrics.py).
PANELS = (("loss", [("loss", "-")], "loss"),
          ("learning rate", [("lr", "-")], "lr"),
          ("throughput", [("images_per_s", "-")], "images/s"),
          ("data-wait share", [("data_wait_share", "-")], "share of step time"),
          ("kNN top-1 (held-out)", [("knn_top1", "-o")], "%"),
          ("effective rank (RankMe)", [("rank_embedding", "-"), ("rank_trunk", "--")], "rank"))


@dataclass
class RunRecords:
    label: str
    records: list = field(default_factory=list)
    unreadable: int = 0  # lines of metrics.jsonl that are not a JSON record (a line cut short by a kill)


def read_records(run_dir: Path, label: str) -> RunRecords:
    run = RunRecords(label=label)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            run.unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            run.records.append(record)
        else:
            run.unreadable += 1
    return run


def find_runs(paths: list[str]) -> list[RunRecords]:
    """Every run (a directory with a metrics.jsonl) given, or found below a given directory (a sweep)."""
    runs = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise FileNotFoundError(f"{given} is not a directory")
        found = [given] if (given / "metrics.jsonl").is_file() else \
            sorted(path.parent for path in given.rglob("metrics.jsonl"))
        if not found:
            raise FileNotFoundError(f"no metrics.jsonl in {given} or below it")
        for run_dir in found:
            runs.append(read_records(run_dir, run_dir.name if run_dir == given else str(run_dir.relative_to(given))))
    return runs


def written_by_fastssl(path: Path, *, software: str = SOFTWARE) -> bool:
    """Whether the PNG at ``path`` carries ``software`` as its "Software" text (fastssl writes it)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.info.get("Software") == software
    except OSError:
        return False


def plot_runs(runs: list[RunRecords], output: Path, *, title: str = "") -> Path:
    """Draw ``runs`` into ``output`` (PNG); refuses (FileExistsError) to replace a file fastssl-plot did not write."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if output.exists() and not written_by_fastssl(output):
        raise FileExistsError(f"{output} exists and was not written by {SOFTWARE}; name another --output")
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (panel_title, series, y_label) in zip(axes.flat, PANELS):
        drawn = False
        for number, run in enumerate(runs):
            for key, style in series:
                points = [(r["step"], r[key]) for r in run.records if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                steps, values = zip(*points)
                label = run.label + (f" ({key})" if len(series) > 1 else "")
                axis.plot(steps, values, style, color=colours[number % len(colours)], label=label, markersize=3)
                drawn = True
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
        if not drawn:
            axis.text(0.5, 0.5, "no records", ha="center", va="center", transform=axis.transAxes, color="grey")
        elif len(runs) > 1 or len(series) > 1:
            axis.legend(fontsize=8)
    figure.suptitle(title or ", ".join(run.label for run in runs)[:120])
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp.png")
    figure.savefig(temporary, dpi=80, metadata={"Software": SOFTWARE})
    plt.close(figure)
    temporary.replace(output)
    return output


def plot_neighbours(queries: list[dict], output: Path, *, title: str, software: str) -> Path:
    """A grid: one row per query, its image then its neighbours' (nearest first), each captioned with its class
    (a neighbour's green where it matches the query's, red where not). queries: [{"image": (H, W, 3) array in
    [0, 1], "label": str | None, "neighbours": [(image, label, similarity), ...]}]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if output.exists() and not written_by_fastssl(output, software=software):
        raise FileExistsError(f"{output} exists and was not written by {software}; name another --output")
    columns = 1 + max(len(query["neighbours"]) for query in queries)
    figure, axes = plt.subplots(len(queries), columns, figsize=(1.6 * columns, 1.7 * len(queries)), squeeze=False)
    for row, query in zip(axes, queries):
        cells = [(query["image"], query["label"] or "query", "black")]
        for image, label, similarity in query["neighbours"]:
            match = query["label"] is not None and label == query["label"]
            colour = "black" if label is None else ("green" if match else "red")
            cells.append((image, f"{label or ''} {similarity:.2f}".strip(), colour))
        for axis, (image, caption, colour) in zip(row, cells):
            axis.imshow(image, interpolation="nearest")
            axis.set_title(caption, fontsize=7, color=colour)
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel("held-out", fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))  # room for the title
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp.png")
    figure.savefig(temporary, dpi=80, metadata={"Software": software})
    plt.close(figure)
    temporary.replace(output)
    return output


def write_run_curves(run_dir: str | Path) -> Path:
    """The end-of-training figure: ``run_dir``/curves.png from its metrics.jsonl."""
    run_dir = Path(run_dir)
    return plot_runs([read_records(run_dir, run_dir.name)], run_dir / CURVES_FILE, title=run_dir.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl-plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory, or a sweep directory")
    parser.add_argument("--output", default=None,
                        help=f"the PNG to write (default with one RUN_DIR: RUN_DIR/{CURVES_FILE})")
    args = parser.parse_args(argv)
    if args.output is None and len(args.runs) > 1:
        print("fastssl-plot: error: several RUN_DIRs: name the PNG with --output", file=sys.stderr)
        return 2
    output = Path(args.output or Path(args.runs[0]) / CURVES_FILE)
    try:
        runs = find_runs(args.runs)
        plot_runs(runs, output)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        print(f"fastssl-plot: error: {error}", file=sys.stderr)
        return 2
    unreadable = sum(run.unreadable for run in runs)
    if unreadable:
        print(f"fastssl-plot: skipped {unreadable} unreadable line(s) of metrics.jsonl", file=sys.stderr)
    records = sum(len(run.records) for run in runs)
    print(f"fastssl-plot: {len(runs)} run(s), {records} records: wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
