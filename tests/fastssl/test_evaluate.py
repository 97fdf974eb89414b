import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fastssl.evaluate import knn_top1, main as eval_main, reestimate_batchnorm
from fastssl.train import main as train_main
from loaders.batch import Batch
from loaders.sources import resolve_image_folder

from test_train_cli import CPU


def test_knn_top1_on_separable_and_on_mixed_features():
    train = torch.eye(3).repeat(4, 1)  # 12 samples, class = position of the 1
    labels = torch.arange(3).repeat(4)
    assert knn_top1(train, labels, torch.eye(3), torch.arange(3), k=3, temperature=0.07) == 100.0
    assert knn_top1(train, labels, torch.eye(3), torch.tensor([1, 2, 0]), k=3, temperature=0.07) == 0.0


def test_reestimated_batchnorm_holds_the_mean_over_the_pass():
    norm = nn.BatchNorm1d(2)
    data = [torch.randn(5, 2) + 3, torch.randn(7, 2) - 1]
    loader = [Batch(crops=[x], indices=torch.arange(len(x))) for x in data]
    reestimate_batchnorm(nn.Sequential(norm), loader)
    # Cumulative average of the per-batch means (what momentum=None computes).
    expected = (data[0].mean(0) + data[1].mean(0)) / 2
    assert torch.allclose(norm.running_mean, expected, atol=1e-6) and not norm.training


def test_eval_cli_on_a_checkpoint_whose_head_was_fitted_to_the_trunk(tmp_path, capsys):
    # dims[0]=999 does not match ResNet-18's 512: training fits it, evaluation must rebuild the same model.
    head = 'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [999, 32], "use_bn": True, "num_clusters": [10]}]]'
    assert train_main(CPU + [f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.num_epochs=1", head]) == 0
    capsys.readouterr()
    assert eval_main(["knn", "--checkpoint", str(tmp_path), "--baselines", "--workers", "0", "--k", "5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"]
    assert set(report) == {"trained", "random_bn_init", "random_bn_reestimated"}
    assert all(0.0 <= value <= 100.0 for value in report.values())
    assert eval_main(["knn", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_knn_on_a_larger_builtin_held_out_split_contains_the_configured_one(tmp_path, capsys):
    assert train_main(CPU + [f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.num_epochs=1"]) == 0
    capsys.readouterr()
    assert eval_main(["knn", "--checkpoint", str(tmp_path), "--workers", "0", "--k", "5", "--val-per-class", "5"]) == 0
    larger = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_path"])
    configured = resolve_image_folder(source="synthetic", data_path=None, split="val", synthetic_params={
        "image_size": 32, "train_per_class": 4, "val_per_class": 2})  # TINY's split
    classes = sorted(p.name for p in larger.iterdir())
    assert len(classes) == 10 and all(len(list((larger / c).iterdir())) == 5 for c in classes)
    for name in classes:  # the same generator and seed: the configured two a class are the first two
        for configured_file in sorted((configured / name).iterdir()):
            assert (larger / name / configured_file.name).read_bytes() == configured_file.read_bytes()
    assert eval_main(["knn", "--checkpoint", str(tmp_path), "--val-per-class", "5", "--val-path", str(larger)]) == 2
    assert "--val-per-class takes the built-in" in capsys.readouterr().err


def _one_error_line(err: str, text: str) -> None:
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastssl-eval: error: ") and text in err, err


def test_knn_on_an_unreadable_or_foreign_checkpoint_is_one_line(tmp_path, capsys):
    damaged = tmp_path / "damaged.torch"
    damaged.write_bytes(bytes(range(256)) * 40)
    assert eval_main(["knn", "--checkpoint", str(damaged)]) == 2
    _one_error_line(capsys.readouterr().err, "cannot read checkpoint")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "torchvision.torch")  # a plain state dict
    assert eval_main(["knn", "--checkpoint", str(tmp_path / "torchvision.torch")]) == 2
    _one_error_line(capsys.readouterr().err, "is not a fastssl training checkpoint")


def test_a_checkpoints_config_is_validated_before_anything_is_built_from_it(tmp_path, capsys):
    users = tmp_path / "users_data"
    users.mkdir()
    (users / "thesis.tex").write_text("precious")
    for config, text in (({"DATA": {"TRAIN": {"SYNTHETIC": {"ROOT": str(users)}}},
                           "LOSS": {"swav_loss": {"temperature": float("inf")}}}, "out of range"),
                         ({"DATA": {"TRAIN": {"SYNTHETIC": {"ROOT": "${oc.env:HOME}"}}}}, "interpolations"),
                         ({"DATA": {"TRAIN": {"SYNTHETIC": {"ROOTS": str(users)}}}}, "unknown config key"),
                         ({"DATA": {"TRAIN": ["not", "a", "mapping"]}}, "must be a mapping")):
        torch.save({"model": {}, "head_params": [], "step": 1, "config": config}, tmp_path / "crafted.torch")
        for command in ("knn", "linear"):
            assert eval_main([command, "--checkpoint", str(tmp_path / "crafted.torch")]) == 2
            _one_error_line(capsys.readouterr().err, text)
    assert [p.name for p in users.iterdir()] == ["thesis.tex"]


def test_knn_refuses_a_zero_k_temperature_or_batch_size(capsys):
    for option, value in (("--k", "0"), ("--temperature", "0"), ("--temperature", "inf"), ("--batch-size", "0"),
                          ("--workers", "-1")):
        with pytest.raises(SystemExit) as exit_:
            eval_main(["knn", "--checkpoint", "x", option, value])
        assert exit_.value.code == 2 and f"argument {option}: must be" in capsys.readouterr().err
