"""ClusterFit step 2 (clusterfit_loss): labels taken through the batch's dataset indices, the loss against a
float64 cross-entropy, labels files that do not fit the run refused in one line, the seed config on meta."""
import math

import numpy as np
import pytest
import torch

from fastssl.builder import derive
from fastssl.config import compose_config
from fastssl.methods.base import RunInfo
from fastssl.methods.clusterfit import ClusterFit, read_labels
from fastssl.train import main
from loaders.batch import Batch

from test_memory_methods_cli import IMAGENET_SAMPLES, TINY, build_on_meta


def run_info(label_paths, *, num_samples=6, num_classes=5):
    return RunInfo(rank=0, world_size=1, batch_size_per_replica=3, global_batch_size=3, num_crops=1,
                   num_train_samples=num_samples, iterations_per_epoch=2, total_iterations=4,
                   device=torch.device("cpu"), head_params=[["mlp", {"dims": [8, num_classes]}]], drop_last=False,
                   label_paths=tuple(label_paths))


def test_loss_uses_the_label_of_each_dataset_index(tmp_path):
    labels = np.array([4, 0, 3, -1, 1, 2], dtype=np.int64)
    np.save(tmp_path / "labels.npy", labels)
    method = ClusterFit.from_config({"ignore_index": -1}, run_info([tmp_path / "labels.npy"]))
    torch.manual_seed(0)
    scores = torch.randn(4, 5)
    indices = torch.tensor([5, 3, 0, 2])  # index 3 is labelled -1: left out
    loss = method.loss(scores, Batch(crops=[torch.zeros(4, 3, 2, 2)], indices=indices), step=0)
    terms = [-math.log(math.exp(scores[row, labels[i]].double()) / scores[row].double().exp().sum())
             for row, i in enumerate(indices.tolist()) if labels[i] != -1]
    assert loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)


@pytest.mark.parametrize("content,message", [
    (np.zeros(5, dtype=np.int64), "has 5 labels but the training data has 6 samples"),
    (np.array([0, 1, 2, 3, 4, 5]), "labels in [0, 5] but the head has 5 outputs"),
    (np.zeros(6, dtype=np.float32), "ClusterFit needs one integer per training sample"),
])
def test_a_labels_file_that_does_not_fit_is_refused(tmp_path, content, message):
    np.save(tmp_path / "labels.npy", content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_labels(tmp_path / "labels.npy", num_samples=6, num_classes=5, ignore_index=-1)


def test_the_entry_point_answers_a_wrong_labels_file_with_one_line(tmp_path, capsys):
    np.save(tmp_path / "labels.npy", np.zeros(7, dtype=np.int64))
    command = TINY + ["config=pretrain/clusterfit/clusterfit_1node_cpu_resnet18", "config.DATA.TRAIN.DATA_LIMIT=8",
                      f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]
    assert main(command + [f"config.DATA.TRAIN.LABEL_PATHS=[{tmp_path / 'labels.npy'}]"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fastssl-train: error: labels file") and "has 7 labels but the training data has 8" in error
    assert main(command) == 2
    assert "clusterfit_loss needs one labels file" in capsys.readouterr().err


def test_seed_command_line_builds_at_full_size(tmp_path):
    """The page's step 2 line on ImageNet-1k, on meta: 16,000 cluster outputs, the labels of every image."""
    labels = np.arange(IMAGENET_SAMPLES, dtype=np.int16) % 16000
    np.save(tmp_path / "labels.npy", labels)
    cfg = compose_config(["config=pretrain/clusterfit/clusterfit_resnet_8gpu_imagenet",
                          f"config.DATA.TRAIN.LABEL_PATHS=[{tmp_path / 'labels.npy'}]"])
    model, method = build_on_meta(cfg)
    assert isinstance(method, ClusterFit) and method.labels.shape == (IMAGENET_SAMPLES,)
    assert model.heads[0][-1].out_features == 16000 and cfg.OPTIMIZER.num_epochs == 105
    assert cfg.OPTIMIZER.param_schedulers.lr.name == "composite"


@pytest.mark.parametrize("nodes,first_epochs", [(1, [0.1] * 6), (4, [0.1, 0.16, 0.22, 0.28, 0.34, 0.4])])
def test_seed_lr_follows_vissls_scaling_of_the_composite(nodes, first_epochs):
    """VISSL's file: linear 0.25 -> 0.1 for 5 of 105 epochs, then steps of 10x at 30, 60, 90, 100, auto-scaled per
    256 images. VISSL's rule starts each linear part from one node's LR: flat 0.1 on one node (8 x 32 = 256
    images), a warm-up 0.1 -> 0.4 on 4 nodes."""
    cfg = compose_config(["config=pretrain/clusterfit/clusterfit_resnet_8gpu_imagenet",
                          f"config.DISTRIBUTED.NUM_NODES={nodes}"])
    lr = derive(cfg, world_size=8 * nodes, num_samples=IMAGENET_SAMPLES, iterations_per_epoch=10).lr_schedule
    assert lr[0:60:10] == pytest.approx(first_epochs)
    assert lr[[300, 600, 900, 1000]] == pytest.approx(np.array([0.01, 0.001, 0.0001, 0.00001]) * nodes)


def test_a_labels_header_claiming_ten_billion_labels_allocates_nothing_and_is_one_line(tmp_path):
    np.save(tmp_path / "labels.npy", np.zeros(6, dtype=np.int64))
    data = (tmp_path / "labels.npy").read_bytes()
    (tmp_path / "labels.npy").write_bytes(data.replace(b"(6,), }" + b" " * 10, b"(10000000000,), }", 1))  # same length
    with pytest.raises(ValueError, match="is not a numpy array of integers"):
        read_labels(tmp_path / "labels.npy", num_samples=6, num_classes=5, ignore_index=-1)
