"""Watching a run (fastssl/monitor.py): RankMe and the normalised std against simple float64 references, the
collapse warning, and end to end: the kNN while training equals fastssl-eval knn's, and never changes the
training; the curves and neighbour PNGs; the export that timm's ResNet loads; W&B offline."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastssl import evaluate, export, plot
from fastssl.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.methods.base import Method
from fastssl.monitor import EmbeddingMonitor, effective_rank, normalised_std
from fastssl.train import main as train_main

TINY = ["config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=1",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
        "config.LOG_FREQUENCY=1", "config.OPTIMIZER.num_epochs=2", "config.MACHINE.DEVICE=cpu"]
SWAV = ["config=pretrain/swav/swav_1node_cpu_resnet18", *TINY,
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[module.heads.0.prototypes0.weight, 1]]"]
# RotNet drawing one random rotation per image: its losses depend on torch's global random stream.
ROTNET = ["config=pretrain/rotnet/rotnet_1node_cpu_resnet18", *TINY, "config.LOSS.rotnet_loss.all_rotations=False",
          "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, {name: RandomHorizontalFlip}, "
          "{name: ToTensor}, {name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]"]


# ---------------- the figures against float64 references ---------------------------------------

def rankme_reference(matrix: np.ndarray) -> float:
    """Garrido et al. 2023, eq. 1, in float64 with a plain loop."""
    singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    total = sum(singular)
    entropy = 0.0
    for value in singular:
        p = value / total + 1e-7
        entropy -= p * math.log(p)
    return math.exp(entropy)


@pytest.mark.parametrize("shape,decay", [((64, 16), 0.0), ((64, 16), 0.5), ((20, 48), 0.2), ((128, 64), 2.0)])
def test_effective_rank_matches_a_float64_reference(shape, decay):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=generator, dtype=torch.float64)
    embeddings = base * torch.exp(-decay * torch.arange(shape[1], dtype=torch.float64))  # a decaying spectrum
    assert effective_rank(embeddings).item() == pytest.approx(rankme_reference(embeddings.numpy()), rel=1e-4)


def test_effective_rank_is_one_on_a_line_and_the_dimension_when_flat():
    line = torch.randn(50, 1) @ torch.randn(1, 32)
    assert effective_rank(line).item() == pytest.approx(1.0, abs=1e-2)
    assert effective_rank(torch.eye(32) * 3).item() == pytest.approx(32.0, rel=1e-4)


def test_normalised_std_matches_a_reference_and_vanishes_when_collapsed():
    embeddings = torch.randn(4000, 64, generator=torch.Generator().manual_seed(1))
    rows = embeddings.numpy().astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert normalised_std(embeddings).item() == pytest.approx(rows.std(axis=0, ddof=1).mean(), rel=1e-5)
    assert normalised_std(embeddings).item() * math.sqrt(64) == pytest.approx(1.0, abs=0.02)
    collapsed = torch.ones(100, 64) + 1e-4 * torch.randn(100, 64)
    assert normalised_std(collapsed).item() * math.sqrt(64) < 0.01


# ---------------- the collapse warning ----------------------------------------------------------

class TinyModel(nn.Module):
    def __init__(self, embedding_dim: int = 8):
        super().__init__()
        self.trunk = nn.Linear(4, 16)
        self.heads = nn.Sequential(nn.Linear(16, embedding_dim))

    def forward(self, inputs):
        return self.heads(self.trunk(inputs))


class Embedder(Method):
    monitors_embedding = True


def monitor_for(model, *, patience=2, stop=False):
    return EmbeddingMonitor(model=model, method=Embedder(), min_rank=2.0, min_std_ratio=0.1, patience=patience,
                            stop_on_collapse=stop)


def test_the_monitor_reads_the_steps_own_tensors():
    model = TinyModel()
    monitor = monitor_for(model)
    assert monitor.read() == {}  # before any step
    inputs = torch.randn(32, 4)
    model(inputs).sum().backward()
    record = monitor.read()
    with torch.no_grad():
        trunk = model.trunk(inputs)
        embedding = model.heads(trunk)
    assert record["rank_trunk"] == pytest.approx(rankme_reference(trunk.numpy()), rel=1e-4)
    assert record["rank_embedding"] == pytest.approx(rankme_reference(embedding.numpy()), rel=1e-4)
    assert record["embedding_std_ratio"] == pytest.approx(normalised_std(embedding).item() * math.sqrt(8), rel=1e-5)
    with torch.no_grad():  # an evaluation pass is not a step
        model(torch.zeros(5, 4))
    assert monitor.read() == {}


def test_a_collapse_warns_once_after_the_patience_naming_the_figure():
    monitor = monitor_for(TinyModel(), patience=2)
    healthy = {"step": 1, "rank_trunk": 9.0, "rank_embedding": 5.0, "embedding_std_ratio": 0.8}
    low = {"step": 2, "rank_trunk": 9.0, "rank_embedding": 1.2, "embedding_std_ratio": 0.8}
    assert monitor.check(low) is None
    assert monitor.check(healthy) is None  # the count starts again
    assert monitor.check(low) is None
    warning = monitor.check({**low, "step": 4})
    assert "rank_embedding 1.20 < 2.0" in warning and "step 4" in warning and "2 log periods" in warning
    assert monitor.check(low) is None  # once per run


def test_one_prototype_for_every_sample_warns_at_once():
    monitor = monitor_for(TinyModel(), patience=5)
    warning = monitor.check({"step": 7, "rank_trunk": 9.0, "prototypes_in_use": 1})
    assert "every sample assigned to one prototype" in warning


# ---------------- end to end -------------------------------------------------------------------

def test_stop_on_collapse_warns_checkpoints_and_stops(tmp_path, capsys):
    """Every rank is below a MIN_RANK of 1000: after PATIENCE 2 log periods (steps 0 and 1), one warning, a
    checkpoint at step 2 and a stop; without STOP_ON_COLLAPSE the same warning and the run goes on."""
    low = ["config.MONITOR.EMBEDDING.MIN_RANK=1000", "config.MONITOR.EMBEDDING.PATIENCE=2"]
    assert train_main(SWAV + low + [f"config.CHECKPOINT.DIR={tmp_path / 'stop'}",
                                    "config.MONITOR.EMBEDDING.STOP_ON_COLLAPSE=True"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the embedding looks collapsed at step 1: rank_trunk") == 1
    assert "for 2 log periods in a row; stopping" in err and "the embedding collapsed (MONITOR.EMBEDDING" in err
    assert latest_checkpoint(tmp_path / "stop").name == "checkpoint_step00000002.torch"
    assert max(r["step"] for r in records(tmp_path / "stop")) == 1
    assert train_main(SWAV + low + [f"config.CHECKPOINT.DIR={tmp_path / 'go_on'}", "config.OPTIMIZER.num_epochs=1"]) == 0
    err = capsys.readouterr().err
    assert err.count("looks collapsed") == 1 and "STOP_ON_COLLAPSE=True stops a run here" in err
    assert max(r["step"] for r in records(tmp_path / "go_on")) == 4


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def swav_run(tmp_path_factory):
    """A SwAV run with the kNN over the whole training set (BANK_SIZE above it), the embedding monitor and
    W&B offline."""
    run_dir = tmp_path_factory.mktemp("swav_monitor")
    status = train_main(SWAV + [f"config.CHECKPOINT.DIR={run_dir}", "config.MONITOR.KNN.ENABLED=True",
                                "config.MONITOR.KNN.BANK_SIZE=100000", "config.HOOKS.WANDB.ENABLED=True",
                                "config.HOOKS.WANDB.MODE=offline"])
    assert status == 0
    return run_dir


def test_the_knn_while_training_is_fastssl_eval_knns_figure(swav_run, capsys):
    knn = [r for r in records(swav_run) if "knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in knn] == [(0, 4), (1, 9)]  # every epoch (EVERY_N_EPOCHS 1)
    assert knn[-1]["knn_images"] == 20
    capsys.readouterr()
    assert evaluate.main(["knn", "--checkpoint", str(swav_run), "--cpu", "--workers", "0"]) == 0
    figure = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"]["trained"]
    assert knn[-1]["knn_top1"] == pytest.approx(figure, abs=1e-9)


def test_every_log_record_carries_the_embedding_figures(swav_run):
    logged = [r for r in records(swav_run) if "loss" in r]
    assert len(logged) == 10
    for record in logged:
        assert 1.0 <= record["rank_trunk"] <= 16  # at most the rows: 2 large crops x 8
        assert 1.0 <= record["rank_embedding"] <= 16
        assert 0 < record["embedding_std_ratio"] < 2
        assert 1 <= record["prototypes_in_use"] <= 30


def test_the_monitor_never_changes_the_training(tmp_path):
    """RotNet with one random rotation per image draws from torch's global stream at every step, the loader's
    workers draw their seeds from it, and the checkpoint holds every BatchNorm statistic: all come out the
    same with the monitor (kNN every epoch, embedding figures every step) as without it."""
    def run(name: str, enabled: bool) -> tuple[list, dict]:
        run_dir = tmp_path / name
        assert train_main(ROTNET + [f"config.CHECKPOINT.DIR={run_dir}", f"config.MONITOR.KNN.ENABLED={enabled}",
                                    f"config.MONITOR.EMBEDDING.ENABLED={enabled}"]) == 0
        return [r["loss"] for r in records(run_dir) if "loss" in r], load_checkpoint(latest_checkpoint(run_dir))

    (with_losses, with_state), (without_losses, without_state) = run("with", True), run("without", False)
    assert with_losses == without_losses and len(with_losses) == 10
    for name, value in with_state["model"].items():
        assert torch.equal(value, without_state["model"][name]), name
    assert [r["step"] for r in records(tmp_path / "with") if "knn_top1" in r] == [4, 9]
    assert "rank_trunk" in records(tmp_path / "with")[0] and "rank_trunk" not in records(tmp_path / "without")[0]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_training_leaves_its_curves_drawn_from_its_records(swav_run, tmp_path):
    curves = png(swav_run / "curves.png")
    assert curves.shape == (640, 1200, 3)
    empty_run = tmp_path / "empty"  # the same steps without a figure: every panel says "no records"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text("".join(json.dumps({"step": r["step"]}) + "\n"
                                                     for r in records(swav_run)))
    assert plot.main([str(empty_run), "--output", str(tmp_path / "empty.png")]) == 0
    empty = png(tmp_path / "empty.png")
    for row in range(2):
        for column in range(3):  # every panel differs from the empty one inside its axes
            cell = (slice(row * 320 + 60, row * 320 + 280), slice(column * 400 + 80, column * 400 + 380))
            assert (np.abs(curves[cell] - empty[cell]).sum(axis=2) > 60).sum() > 200, (row, column)


def test_plot_overlays_a_sweep_and_refuses_a_file_it_did_not_write(swav_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for name, scale in (("lr_0.1", 1.0), ("lr_0.3", 3.0)):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": step, "epoch": 0, "loss": scale / (1 + step), "lr": 0.1}) + "\n"
            for step in range(20)) + '{"step": 3, "lo')  # a line cut short by a kill: skipped, counted
    assert plot.main([str(sweep)]) == 0
    captured = capsys.readouterr()
    assert "2 run(s), 40 records" in captured.out and "skipped 2 unreadable line(s)" in captured.err
    with Image.open(sweep / "curves.png") as image:
        assert image.size == (1200, 640) and image.info["Software"] == "fastssl-plot"
    foreign = tmp_path / "mine.png"
    Image.new("RGB", (4, 4)).save(foreign)
    before = foreign.read_bytes()
    assert plot.main([str(sweep), "--output", str(foreign)]) == 2
    assert foreign.read_bytes() == before
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert plot.main([str(sweep / "lr_0.1"), str(sweep / "lr_0.3")]) == 2  # several: --output needed
    assert "fastssl-plot: error:" in capsys.readouterr().err


def test_the_neighbour_grid(swav_run, capsys):
    assert evaluate.main(["neighbours", "--checkpoint", str(swav_run), "--cpu", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "12 held-out images and their 6 nearest training images" in out
    assert "neighbours share the query's class" in out  # the built-in dataset has class names
    grid = png(swav_run / "neighbours.png")
    assert grid.shape[0] > 12 * 100 and grid.shape[1] > 7 * 100
    assert grid.std() > 20  # images drawn, not a blank page
    with Image.open(swav_run / "neighbours.png") as image:
        assert image.info["Software"] == "fastssl-eval neighbours"


def test_the_torchvision_export_loads_into_timms_resnet(swav_run, tmp_path):
    timm = pytest.importorskip("timm")
    exported = tmp_path / "resnet18.torch"
    assert export.main([str(swav_run), str(exported)]) == 0
    model = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = model.load_state_dict(torch.load(exported), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    from fastssl.builder import config_from_checkpoint
    from fastssl.run_model import build_run_model
    saved = load_checkpoint(latest_checkpoint(swav_run))
    ours = build_run_model(config_from_checkpoint(saved), head_params=saved["head_params"])
    ours.load_state_dict(saved["model"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.eval().forward_head(model.forward_features(images), pre_logits=True)
        assert torch.allclose(theirs, ours.trunk.eval()(images), atol=1e-5)


def test_wandb_logs_offline_beside_tensorboard(swav_run):
    pytest.importorskip("wandb")
    runs = list((swav_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_the_knn_of_two_ranks_equals_one_process(monkeypatch):
    """Uneven shards (a bank of one in six of 40 training images: 7, as 3 + 4; held-out 20), gathered and summed."""
    from rank_harness import run_ranks

    from fastssl.monitor import KnnMonitor
    from loaders.build import build_eval_loader
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def knn(rank, world_size):
        def loader(split, max_samples):
            return build_eval_loader(source="synthetic", data_path=None, split=split, image_size=32, batch_size=4,
                                     num_workers=0, data_limit=-1, device="cpu", dtype=torch.float32,
                                     synthetic_params=dict(root=None, image_size=32, train_per_class=4,
                                                           val_per_class=2),
                                     mean=(0.5,) * 3, std=(0.25,) * 3, rank=rank, world_size=world_size,
                                     max_samples=max_samples)
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        monitor = KnnMonitor(bank_loader=loader("train", 7), test_loader=loader("val", 0), k=5, temperature=0.07,
                             every_n_epochs=1, num_epochs=1)
        return monitor.evaluate(trunk), len(monitor.bank_loader.shard)

    one = knn(0, 1)
    two = run_ranks(knn, world_size=2, deadline_s=120)
    assert one[1] == 7 and [shard for _, shard in two] == [3, 4]
    assert [figures for figures, _ in two] == [one[0], one[0]] and one[0][1] == 20
