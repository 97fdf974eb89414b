"""ClusterFit step 1 (fastssl/clusterfit.py) and the whole pipeline through the entry points: RotNet ->
features + k-means -> training on the labels -> kNN. The labels file format, a stopped extraction resumed
to the same result, 2 ranks extracting what 1 rank does, step 2 resumed exactly, the page's seed command
lines composed at full size and run CPU-sized."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastssl.builder import build_cluster_features
from fastssl.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.clusterfit import cluster_features, kmeans_labels, l2_normalize, rank_chunks, read_chunk
from fastssl.config import compose_config
from fastssl.dist import DistInfo
from fastssl.evaluate import main as eval_main
from fastssl.train import main
from loaders.images import list_images
from rank_harness import run_ranks

SMALL = ["config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
         "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
         "config.DATA.TRAIN.DATA_LIMIT=16", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
         "config.LOG_FREQUENCY=1", "config.MACHINE.DEVICE=cpu"]
TRAIN = SMALL + ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=2"]
FEATURES = SMALL + ["config.CLUSTERFIT.FEATURES.BATCHSIZE_PER_REPLICA=3", "config.CLUSTERFIT.FEATURES.CHUNK_BATCHES=2"]
K = 4  # clusters of the 16 images (the CPU configs' K = 10 needs more images than a test of seconds reads)
LABELS = f"synthetic_train_res5_N{K}_D512_labels.npy"
TINY_CROPS = "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, {name: ToTensor}]"


def read_metrics(directory):
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def extracted(directory: Path, world_size: int = 1) -> torch.Tensor:
    """The features of every rank's chunks, rank order."""
    features_dir = next(directory.glob("features_*"))
    return torch.cat([read_chunk(path)["features"] for rank in range(world_size)
                      for path in rank_chunks(features_dir, rank=rank)])


# ---------------- k-means ---------------------------------------------------------------------------

def test_features_are_normalised_as_vissl():
    features = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float32)
    expected = features / (np.sqrt((features.astype(np.float64) ** 2).sum(1, keepdims=True)) + 1e-5)
    assert np.allclose(l2_normalize(features), expected, atol=1e-7)


def test_kmeans_recovers_separable_blobs_with_a_fixed_seed():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    truth = np.repeat(np.arange(3), 40)
    points = (centres[truth] + rng.normal(scale=0.1, size=(120, 8))).astype(np.float32)
    labels, centroids = kmeans_labels(points, num_clusters=3, num_iter=20, seed=1)
    assert labels.dtype == np.int64 and labels.shape == (120,) and centroids.shape == (3, 8)
    assert len({(t, l) for t, l in zip(truth, labels)}) == 3  # the same partition, up to the cluster names
    assert np.array_equal(kmeans_labels(points, num_clusters=3, num_iter=20, seed=1)[0], labels)
    with pytest.raises(ValueError, match="more than the 120 samples"):
        kmeans_labels(points, num_clusters=121, num_iter=1, seed=1)


# ---------------- the pipeline on the CPU configs ------------------------------------------------------

@pytest.fixture(scope="module")
def rotnet_weights(tmp_path_factory):
    """A RotNet trained 2 epochs on 16 synthetic images (its last checkpoint)."""
    directory = tmp_path_factory.mktemp("rotnet")
    assert main(TRAIN + ["config=pretrain/rotnet/rotnet_1node_cpu_resnet18", TINY_CROPS,
                         f"config.CHECKPOINT.DIR={directory}"]) == 0
    records = read_metrics(directory)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(0 < r["loss"] < 5 for r in records)
    return latest_checkpoint(directory)


def step1(directory, weights, *extra):
    return main(FEATURES + ["config=pretrain/clusterfit/cluster_features_1node_cpu_resnet18",
                            f"config.CLUSTERFIT.NUM_CLUSTERS={K}", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}",
                            "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, {name: ToTensor}]",
                            f"config.CHECKPOINT.DIR={directory}", *extra])


@pytest.fixture(scope="module")
def step1_straight(tmp_path_factory, rotnet_weights):
    directory = tmp_path_factory.mktemp("step1")
    assert step1(directory, rotnet_weights) == 0
    return directory


def test_step1_writes_one_label_per_sample_in_dataset_order(step1_straight):
    labels = np.load(step1_straight / LABELS)
    assert labels.dtype == np.int64 and labels.shape == (16,) and labels.min() >= 0 and labels.max() < K
    images = np.load(step1_straight / LABELS.replace("labels", "images"))
    cfg = compose_config(SMALL + ["config=pretrain/clusterfit/cluster_features_1node_cpu_resnet18"])
    folder = Path(images[0]).parent.parent
    assert images.tolist() == list_images(folder, data_limit=16)[0]  # the data source's order
    summary = json.loads((step1_straight / LABELS.replace("labels.npy", "summary.json")).read_text())
    sizes = np.bincount(labels, minlength=K)
    assert summary["samples"] == 16 and summary["clusters"] == K
    assert summary["empty_clusters"] == int((sizes == 0).sum()) and summary["largest_cluster"] == sizes.max()
    assert summary["seconds"] > 0 and cfg.CLUSTERFIT.FEATURES.LAYER_NAME == "res5"
    assert np.load(step1_straight / LABELS.replace("labels", "centroids")).shape == (K, 512)
    # 16 images in batches of 3: 6 batches, chunks of at most 2 batches (the last has one image)
    chunks = rank_chunks(next(step1_straight.glob("features_*")), rank=0)
    assert [read_chunk(path)["num_batches"] for path in chunks] == [2, 2, 2]
    assert torch.equal(torch.cat([read_chunk(path)["indices"] for path in chunks]), torch.arange(16))


def test_step1_trunk_is_the_weights_file_frozen_in_eval_mode(rotnet_weights):
    cfg = compose_config(FEATURES + ["config=pretrain/clusterfit/cluster_features_1node_cpu_resnet18",
                                     f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={rotnet_weights}"])
    job = build_cluster_features(cfg, info=DistInfo(), device=torch.device("cpu"), signal_received=lambda: False)
    trained = load_checkpoint(rotnet_weights)["model"]
    assert not job.trunk.training and not any(p.requires_grad for p in job.trunk.parameters())
    for name, value in job.trunk.state_dict().items():
        if name.endswith("num_batches_tracked"):  # SKIP_LAYERS
            continue
        assert torch.equal(value, trained[f"trunk.{name}"]), name


def test_a_signal_saves_the_batches_done_and_stops(tmp_path, rotnet_weights):
    """SIGTERM / SIGUSR1 (the entry point's flag): the rank saves what it has extracted and stops, no labels."""
    cfg = compose_config(FEATURES + ["config=pretrain/clusterfit/cluster_features_1node_cpu_resnet18",
                                     f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={rotnet_weights}", TINY_CROPS,
                                     f"config.CHECKPOINT.DIR={tmp_path}"])
    job = build_cluster_features(cfg, info=DistInfo(), device=torch.device("cpu"), signal_received=lambda: True)
    assert cluster_features(job) is None and not list(tmp_path.glob("*_labels.npy"))
    assert [read_chunk(path)["num_batches"] for path in rank_chunks(job.features_dir, rank=0)] == [1]


def test_a_stopped_extraction_resumes_to_the_same_labels(tmp_path, rotnet_weights, step1_straight):
    assert step1(tmp_path, rotnet_weights, "config.CLUSTERFIT.FEATURES.MAX_BATCHES=3") == 0
    assert not (tmp_path / LABELS).exists()  # stopped midway: no labels yet
    chunks = rank_chunks(next(tmp_path.glob("features_*")), rank=0)
    assert [read_chunk(path)["num_batches"] for path in chunks] == [2, 1]
    assert step1(tmp_path, rotnet_weights) == 0  # the same command, without the limit
    assert [read_chunk(path)["num_batches"] for path in rank_chunks(chunks[0].parent, rank=0)] == [2, 1, 2, 1]
    assert torch.equal(extracted(tmp_path), extracted(step1_straight))
    assert np.array_equal(np.load(tmp_path / LABELS), np.load(step1_straight / LABELS))


def test_two_ranks_extract_what_one_rank_does(tmp_path, rotnet_weights, step1_straight):
    def rank_main(rank, world_size):
        return step1(tmp_path, rotnet_weights, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2")
    assert run_ranks(rank_main, world_size=2, init_group=False, deadline_s=120) == [0, 0]
    features_dir = next(tmp_path.glob("features_*"))
    assert "2ranks" in features_dir.name and rank_chunks(features_dir, rank=1)  # each rank wrote its shard
    assert torch.allclose(extracted(tmp_path, world_size=2), extracted(step1_straight), atol=1e-5)
    assert np.array_equal(np.load(tmp_path / LABELS), np.load(step1_straight / LABELS))


def test_step2_trains_on_the_labels_resumes_exactly_and_evaluates(tmp_path, step1_straight, capsys):
    command = TRAIN + ["config=pretrain/clusterfit/clusterfit_1node_cpu_resnet18",
                       f'config.MODEL.HEAD.PARAMS=[["mlp", {{"dims": [512, {K}]}}]]',
                       "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, "
                       "{name: ColorJitter, brightness: [0.6, 1.4], hue: 0.1}, {name: ToTensor}]",
                       f"config.DATA.TRAIN.LABEL_PATHS=[{step1_straight / LABELS}]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(command + [f"config.CHECKPOINT.DIR={straight}"]) == 0
    records = read_metrics(straight)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    resumed.mkdir()
    first = sorted(straight.glob("checkpoint_step*.torch"))[0]
    (resumed / first.name).write_bytes(first.read_bytes())
    assert main(command + [f"config.CHECKPOINT.DIR={resumed}"]) == 0
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in records[2:]]
    a, b = (load_checkpoint(latest_checkpoint(d))["model"] for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert eval_main(["knn", "--checkpoint", str(straight), "--cpu", "--workers", "0", "--baselines"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"]
    assert set(report) == {"trained", "random_bn_init", "random_bn_reestimated"}
    assert all(0 <= value <= 100 for value in report.values())


# ---------------- the page's command lines ------------------------------------------------------------

STEP1_NAMES = ["pretrain/clusterfit/cluster_features_resnet_8gpu_rotation_in1k",
               "pretrain/clusterfit/cluster_features_resnet_8gpu_imagenet"]


@pytest.mark.parametrize("name", STEP1_NAMES, ids=["page", "vissl"])
def test_step1_seed_configs_compose_at_full_size(name):
    cfg = compose_config([f"config={name}", "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=/weights.torch"])
    assert cfg.ENGINE_NAME == "cluster_features" and cfg.CLUSTERFIT.NUM_CLUSTERS == 16000
    assert cfg.CLUSTERFIT.NUM_ITER == 50 and cfg.CLUSTERFIT.CLUSTER_BACKEND == "faiss"
    assert cfg.CLUSTERFIT.FEATURES.LAYER_NAME == "res5" and cfg.CLUSTERFIT.FEATURES.DATA_PARTITION == "TRAIN"
    assert cfg.MODEL.TRUNK.RESNETS.DEPTH == 50 and cfg.DISTRIBUTED.NUM_PROC_PER_NODE == 8
    assert "heads" in cfg.MODEL.WEIGHTS_INIT.SKIP_LAYERS


# The page's lines made CPU-sized: one process, the built-in images at 32 px, ResNet-18.
CPU_SIZED = SMALL + ["config.DATA.TRAIN.DATA_SOURCES=[synthetic]", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
                     "config.DISTRIBUTED.BACKEND=gloo", "config.MODEL.TRUNK.RESNETS.DEPTH=18",
                     "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=1"]


def test_the_pages_command_lines_run_cpu_sized(tmp_path):
    rotnet, features, clusterfit = tmp_path / "rotnet", tmp_path / "features", tmp_path / "clusterfit"
    assert main(["config=pretrain/rotnet/rotnet_8gpu_resnet", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", *CPU_SIZED,
                 TINY_CROPS, f"config.CHECKPOINT.DIR={rotnet}"]) == 0
    assert main(["config=pretrain/clusterfit/cluster_features_resnet_8gpu_rotation_in1k",
                 f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={latest_checkpoint(rotnet)}", *CPU_SIZED, TINY_CROPS,
                 "config.CLUSTERFIT.NUM_CLUSTERS=3", "config.CLUSTERFIT.N_ITER=5",
                 f"config.CHECKPOINT.DIR={features}"]) == 0
    labels = features / "imagenet1k_train_res5_N3_D512_labels.npy"
    assert np.load(labels).shape == (16,)
    assert main(["config=pretrain/clusterfit/clusterfit_resnet_8gpu_imagenet",
                 f"config.DATA.TRAIN.LABEL_PATHS=[{labels}]",
                 *CPU_SIZED, "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, "
                 "{name: ColorJitter, brightness: [0.6, 1.4], contrast: [0.6, 1.4], saturation: [0.6, 1.4], "
                 "hue: [-0.2, 0.2]}, {name: RandomHorizontalFlip}, {name: ToTensor}]",
                 f"config.CHECKPOINT.DIR={clusterfit}"]) == 0
    assert load_checkpoint(latest_checkpoint(clusterfit))["model"]["heads.0.0.weight"].shape == (16000, 512)


# ---------------- the CPU configs at their own size (slow) -------------------------------------------

@pytest.mark.slow
def test_cpu_configs_pipeline_at_full_cpu_size(tmp_path, capsys):
    """rotnet_1node_cpu_resnet18 -> cluster_features_1node_cpu_resnet18 (K = 10) -> clusterfit_1node_cpu_resnet18
    -> kNN, on the 2,000 synthetic images: the ClusterFit trunk beats chance."""
    quiet = ["config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]
    assert main(["config=pretrain/rotnet/rotnet_1node_cpu_resnet18", *quiet,
                 f"config.CHECKPOINT.DIR={tmp_path / 'r'}"]) == 0
    assert main(["config=pretrain/clusterfit/cluster_features_1node_cpu_resnet18", *quiet,
                 f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={latest_checkpoint(tmp_path / 'r')}",
                 f"config.CHECKPOINT.DIR={tmp_path / 'f'}"]) == 0
    labels = tmp_path / "f" / "synthetic_train_res5_N10_D512_labels.npy"
    assert np.load(labels).shape == (2000,)
    assert main(["config=pretrain/clusterfit/clusterfit_1node_cpu_resnet18", *quiet,
                 f"config.DATA.TRAIN.LABEL_PATHS=[{labels}]", f"config.CHECKPOINT.DIR={tmp_path / 'c'}"]) == 0
    capsys.readouterr()
    assert eval_main(["knn", "--checkpoint", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"]["trained"] > 10.0


def test_write_atomically_never_follows_a_link_planted_at_its_temporary_name(tmp_path):
    from fastssl.clusterfit import write_atomically

    target = tmp_path / "users_file"
    target.write_bytes(b"mine")
    (tmp_path / f".labels.npy.tmp-{os.getpid()}").symlink_to(target)
    write_atomically(tmp_path / "labels.npy", lambda f: f.write(b"labels"))
    assert target.read_bytes() == b"mine" and (tmp_path / "labels.npy").read_bytes() == b"labels"


def test_a_damaged_feature_chunk_is_one_line_and_the_same_command_resumes_past_it(tmp_path, rotnet_weights,
                                                                                   step1_straight, capsys):
    from fastssl.clusterfit import DamagedChunk
    assert step1(tmp_path, rotnet_weights, "config.CLUSTERFIT.FEATURES.MAX_BATCHES=3") == 0
    chunks = rank_chunks(next(tmp_path.glob("features_*")), rank=0)
    chunks[0].write_bytes(chunks[0].read_bytes()[:100])  # a copy cut short
    with pytest.raises(DamagedChunk, match=r"feature chunk \S+ is damaged"):
        read_chunk(chunks[0])
    capsys.readouterr()
    assert step1(tmp_path, rotnet_weights) == 0
    err = capsys.readouterr().err
    assert "is damaged" in err and "removed and are extracted again" in err
    assert [read_chunk(path)["num_batches"] for path in rank_chunks(chunks[0].parent, rank=0)] == [2, 2, 2]
    assert np.array_equal(np.load(tmp_path / LABELS), np.load(step1_straight / LABELS))
