"""fastssl-bench learn, CPU-sized: a recipe trained for one short epoch on the built-in set, its trunk scored by
kNN and a linear probe beside random trunks; the linear probe checked against a separable problem."""
import json

import pytest
import torch

from benchmarks import learn


def test_linear_probe_separates_what_is_linearly_separable_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 4
    labels = torch.arange(400) % 4
    points = centres[labels] + torch.randn(400, 16, generator=generator)
    assert learn.linear_probe(points[:300], labels[:300], points[300:], labels[300:]) > 95
    noise = torch.randn(400, 16, generator=generator)
    assert learn.linear_probe(noise[:300], labels[:300], noise[300:], labels[300:]) < 50


def test_learn_smoke_reports_trained_and_random_trunks(tmp_path, capsys):
    status = learn.main(["--configs", "pretrain/swav/swav_1node_cpu_resnet18", "--dataset", "synthetic",
                         "--epochs", "1", "--out", str(tmp_path), "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=13",
                         "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=3", "config.DATA.NUM_DATALOADER_WORKERS=0"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    result = json.loads(printed.strip().splitlines()[-1])
    row = result["rows"][0]
    assert row["steps"] == 2 and row["test_images"] == 30 and row["loader"] == "torchvision"
    for key in ("trained", "random_bn_init", "random_bn_reestimated"):
        for metric in ("knn", "linear"):
            assert 0 <= row[key][metric]["mean"] <= 100
    assert row["knn_margin"] == pytest.approx(row["trained"]["knn"]["mean"] - max(
        row["random_bn_init"]["knn"]["mean"], row["random_bn_reestimated"]["knn"]["mean"]))
    assert row["wall_s"] > 0 and row["images_per_s"] > 0
    # The two random trunks differ (BatchNorm re-estimated changes the features) and the run is kept: a second
    # call evaluates it again without training.
    assert (tmp_path / "synthetic").is_dir()
    assert learn.main(["--configs", "pretrain/swav/swav_1node_cpu_resnet18", "--dataset", "synthetic", "--epochs", "1",
                       "--out", str(tmp_path), "--no-baselines", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=13",
                       "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=3"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert again["trained"]["knn"]["mean"] == row["trained"]["knn"]["mean"] and "random_bn_init" not in again


def test_learn_refuses_an_unknown_loader():
    with pytest.raises(SystemExit):
        learn.main(["--loaders", "pillow"])
