"""Linear evaluation: top-k against a hand example, the frozen trunk (BatchNorm in eval mode, no gradient,
weights bit-identical after training), the seed configs on meta at full size, CPU runs through the entry
point (2 ranks equal 1 process, resume exactly) and fastssl-eval linear."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from fastssl.builder import build_method, derive, run_info
from fastssl.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.config import ConfigError, compose_config
from fastssl.evaluate import main as eval_main
from fastssl.methods.linear_eval import LinearEvaluation, topk_correct
from fastssl.models import FeatureEvalModel, build_feature_eval_model
from fastssl.run_model import build_run_model, check_feature_eval, resolve_head_params, weights_init_options
from fastssl.train import main
from loaders.batch import Batch
from rank_harness import run_ranks

SYNTHETIC = "benchmark/linear_image_classification/synthetic/eval_resnet18_1node_cpu_linear"
IN1K = "benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear"
BYOL = "benchmark/linear_image_classification/imagenet1k/byol_transfer_in1k_linear"
TINY_DATA = ["config.MACHINE.DEVICE=cpu", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
             "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
             "config.LOG_FREQUENCY=1", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]
CPU = [f"config={SYNTHETIC}", *TINY_DATA, "config.DATA.TRAIN.DATA_LIMIT=8", "config.OPTIMIZER.num_epochs=2",
       "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.DATA.TEST.BATCHSIZE_PER_REPLICA=8"]


@pytest.fixture(scope="module")
def tiny_run():
    """RunInfo of a one-process CPU run of the synthetic config."""
    cfg = compose_config([f"config={SYNTHETIC}"])
    derived = derive(cfg, world_size=1, num_samples=64, iterations_per_epoch=1)
    return run_info(cfg, derived, rank=0, device=torch.device("cpu"), head_params=[])


def test_topk_correct_against_a_hand_example():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3, 0.2, 0.5],    # order 1 5 3 4 0 2
                           [0.8, 0.1, 0.2, 0.3, 0.4, 0.5],    # order 0 5 4 3 2 1
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])   # order 5 4 3 2 1 0
    labels = torch.tensor([1, 2, 0])  # top-1 hit; rank 5 (a top-5 hit); rank 6 (no hit)
    assert topk_correct(logits, labels, (1, 5)).tolist() == [1, 2]
    assert topk_correct(logits, labels, (1, 2, 6)).tolist() == [1, 1, 3]
    assert topk_correct(logits[:, :3], labels, (1, 5)).tolist() == [1, 3]  # k above the classes: all


def tiny_model() -> FeatureEvalModel:
    resnet = {"DEPTH": 18, "WIDTH_MULTIPLIER": 1, "GROUPS": 1, "WIDTH_PER_GROUP": 64, "ZERO_INIT_RESIDUAL": False,
              "CONV_INIT": "pytorch", "STEM": "imagenet"}
    return build_feature_eval_model(
        trunk_name="resnet", resnet=resnet, regnet={}, alexnet=None, channels_last=False, flatten=False,
        head_params=[["eval_mlp", {"in_channels": 256, "dims": [256 * 4, 5]}], ["mlp", {"dims": [512, 5]}]],
        feature_pool_ops=[["res4", ["AdaptiveAvgPool2d", [[2, 2]]]], ["res5avg", ["Identity", []]]])


def test_the_step_runs_the_trunk_in_eval_mode_without_a_graph_and_the_heads_with_one(tiny_run):
    torch.manual_seed(0)
    model = tiny_model()
    model.trunk.requires_grad_(False)
    method = LinearEvaluation(ignore_index=-1, temperature=1.0, run=tiny_run)
    method.bind(model)
    method.set_train_mode(model)
    assert not any(m.training for m in model.trunk.modules()) and all(h.training for h in model.heads)
    statistics = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    batch = Batch(crops=[torch.randn(4, 3, 32, 32)], indices=torch.arange(4), labels=torch.tensor([0, 1, 2, 3]))
    loss = method.training_loss(model, batch, step=0)
    loss.backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in statistics.items())  # BN stats kept
    features = model.features(batch.crops[0])
    assert [tuple(f.shape) for f in features] == [(4, 256, 2, 2), (4, 512)]
    expected = sum(torch.nn.functional.cross_entropy(logits, batch.labels) for logits in model(features))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # VISSL's sum over heads


def test_the_method_refuses_a_model_without_a_frozen_trunk(tiny_run):
    with pytest.raises(ValueError, match="frozen trunk"):
        LinearEvaluation(ignore_index=-1, temperature=1.0, run=tiny_run).bind(tiny_model())


@pytest.mark.parametrize("name, heads, peak_lr, world_size", [(IN1K, 7, 0.01, 8), (BYOL, 6, 0.8, 32),
                                                              (SYNTHETIC, 1, 0.05, 1)])
def test_seed_configs_compose_and_build_on_meta_at_full_size(name, heads, peak_lr, world_size):
    cfg = compose_config([f"config={name}"])
    head_params = resolve_head_params(cfg)
    check_feature_eval(cfg, head_params=head_params)  # every head fits its pooled layer at the crop sizes
    model = build_run_model(cfg, head_params=head_params, on_meta=True)
    assert isinstance(model, FeatureEvalModel) and len(model.heads) == heads
    derived = derive(cfg, world_size=world_size, num_samples=1281167 if world_size > 1 else 2000,
                     iterations_per_epoch=1281167 // (32 * world_size) if world_size > 1 else 32)
    assert derived.lr_schedule.max() == pytest.approx(peak_lr)
    method = build_method(cfg, run_info(cfg, derived, rank=0, device=torch.device("meta"), head_params=head_params))
    model.trunk.requires_grad_(False)
    method.bind(model)
    assert cfg.OPTIMIZER.nesterov and cfg.TEST_MODEL
    if name == BYOL:  # byol.txt: 100 epochs, a cosine from the base value to 0
        assert cfg.OPTIMIZER.num_epochs == 100 and derived.lr_schedule[-1] < 1e-4


def test_a_head_that_does_not_fit_its_layer_is_named():
    cfg = compose_config([f"config={IN1K}", "config.MODEL.TRUNK.RESNETS.DEPTH=18"])  # res2 has 64 channels
    expected = (r"PARAMS\[1\] takes in_channels and dims\[0\] \(256, 9216\) but res2 pooled by .* at 224 px "
                r"is 64 x 6 x 6: it needs \(64, 2304\)")
    with pytest.raises(ValueError, match=expected):
        check_feature_eval(cfg, head_params=resolve_head_params(cfg))


def read_losses(directory):
    return [json.loads(line)["loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def read_final(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("phase") == "end"][-1]


def test_cpu_run_keeps_the_trunk_bit_identical_and_resumes_exactly(tmp_path):
    torch.manual_seed(3)
    trunk = tiny_model().trunk
    with torch.no_grad():  # statistics far from their init: a trunk in train mode would move them
        for module in trunk.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    weights = {f"trunk.{name}": value for name, value in trunk.state_dict().items()}
    torch.save({"model": weights, "step": 0}, tmp_path / "weights.torch")
    command = CPU + [f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tmp_path / 'weights.torch'}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(command + [f"config.CHECKPOINT.DIR={straight}"]) == 0
    final = load_checkpoint(latest_checkpoint(straight))
    for name, value in weights.items():
        if not name.endswith("num_batches_tracked"):  # left at its init (SKIP_LAYERS)
            assert torch.equal(final["model"][name], value), name
    assert final["model"]["trunk.bn1.num_batches_tracked"] == 0  # never in train mode
    first = load_checkpoint(sorted(straight.glob("checkpoint_step*.torch"))[0])
    assert first["step"] == 1
    assert not torch.equal(first["model"]["heads.0.clf.0.weight"], final["model"]["heads.0.clf.0.weight"])
    optimized = sum(len(group["params"]) for group in final["optimizer"]["param_groups"])
    assert optimized == 4  # the eval_mlp's BatchNorm weight and bias, the linear layer's weight and bias

    resumed.mkdir()
    checkpoint = sorted(straight.glob("checkpoint_step*.torch"))[0]
    (resumed / checkpoint.name).write_bytes(checkpoint.read_bytes())
    assert main(command + [f"config.CHECKPOINT.DIR={resumed}"]) == 0
    assert read_losses(resumed) == read_losses(straight)[1:]
    again = load_checkpoint(latest_checkpoint(resumed))
    assert all(torch.equal(final["model"][k], again["model"][k]) for k in final["model"])
    ends = read_final(straight), read_final(resumed)
    assert ends[0]["test_images"] == 20 and {k: ends[0][k] for k in ("top1", "top5")} == {
        k: ends[1][k] for k in ("top1", "top5")}


def test_two_ranks_equal_one_process_for_the_classifier_and_the_held_out_accuracy(tmp_path, monkeypatch):
    # One step on 8 samples: 2 ranks x 4 with the head's BatchNorm synchronised, against 1 x 8; the test
    # split's 20 images are scored 10 per rank and the counts summed.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one_step = CPU + ["config.OPTIMIZER.num_epochs=1"]
    two = one_step + ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
                      f"config.CHECKPOINT.DIR={tmp_path / 'two'}"]

    def rank_main(rank, world_size):
        return main(two)
    assert run_ranks(rank_main, world_size=2, init_group=False, deadline_s=120) == [0, 0]
    assert main(one_step + [f"config.CHECKPOINT.DIR={tmp_path / 'one'}"]) == 0
    saved = {name: load_checkpoint(latest_checkpoint(tmp_path / name)) for name in ("one", "two")}
    assert read_losses(tmp_path / "one")[0] == pytest.approx(read_losses(tmp_path / "two")[0], rel=1e-5)
    for key, value in saved["one"]["model"].items():
        if value.is_floating_point():
            assert (value - saved["two"]["model"][key]).abs().max() <= 1e-5 * value.abs().max() + 1e-6, key
    one, two = read_final(tmp_path / "one"), read_final(tmp_path / "two")
    assert two["test_images"] == one["test_images"] == 20
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])


@pytest.mark.parametrize("override, message", [
    ("config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=False", "needs FREEZE_TRUNK_ONLY=True"),
    ("config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=False", "frozen trunk"),
    ('config.DATA.TEST.TRANSFORMS=[{"name": "Resize", "size": 37, "interpolation": 3}, {"name": "CenterCrop", '
     '"size": 32}, {"name": "ToTensor"}, {"name": "Normalize", "mean": [0, 0, 0], "std": [1, 1, 1]}]',
     "Resize has no key 'interpolation'"),
    ('config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[["res5", ["AvgPool2d", [[6, 6], 1, 0]]]]',
     "does not fit 32 px"),
    ('config.MODEL.HEAD.PARAMS=[["eval_mlp", {"in_channels": 512, "dims": [512, 5]}]]', "has 5 outputs for the 10"),
])
def test_bad_settings_are_one_line_errors(override, message, tmp_path, capsys):
    head = 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [512, 10]}]]'
    extra = [head] if "EVAL_MODE_ON=False" in override else []
    assert main(CPU + [override, *extra, f"config.CHECKPOINT.DIR={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_eval_cli_trains_a_classifier_on_a_checkpoint_and_on_a_random_trunk(tmp_path, capsys):
    # A checkpoint of the BYOL CPU config as fastssl-train writes one (what the command reads of it).
    cfg = compose_config(["config=pretrain/byol/byol_1node_cpu_resnet18", *TINY_DATA])
    head_params = resolve_head_params(cfg)
    model = build_run_model(cfg, head_params=head_params)
    torch.save({"model": model.state_dict(), "step": 1, "config": OmegaConf.to_container(cfg),
                "head_params": head_params}, tmp_path / "checkpoint_step00000001.torch")
    small = ["--epochs", "1", "--cpu", "config.DATA.NUM_DATALOADER_WORKERS=0", "config.DATA.TRAIN.DATA_LIMIT=8",
             "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]
    for extra, directory in (([], "linear_eval"), (["--random-trunk"], "linear_eval_random")):
        assert eval_main(["linear", "--checkpoint", str(tmp_path), *small, *extra]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["run"] == str(tmp_path / directory) and report["test_images"] == 20
        assert 0.0 <= report["linear"]["top1"] <= report["linear"]["top5"] <= 100.0
        saved = load_checkpoint(latest_checkpoint(tmp_path / directory))
        assert saved["config"]["MODEL"]["HEAD"]["PARAMS"] == [["eval_mlp", {"in_channels": 512, "dims": [512, 10]}]]
        assert bool(saved["config"]["MODEL"]["WEIGHTS_INIT"]["PARAMS_FILE"]) == (directory == "linear_eval")
    # A held-out folder given (here the built-in split at 3 a class) is the one tested, not the run's own 20.
    assert eval_main(["linear", "--checkpoint", str(tmp_path), *small, "--val-per-class", "3",
                      "--output", str(tmp_path / "larger")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_images"] == 30
    assert eval_main(["linear", "--checkpoint", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", [IN1K, BYOL])
def test_imagenet_seed_configs_run_a_step_and_test_at_full_size(name, tmp_path):
    # ResNet-50 at 224 px, every head of the seed (conv1..res5 pooled maps, the res5 pool): one step, then
    # the held-out top-k of each head; the built-in dataset stands in for ImageNet.
    command = [f"config={name}", *TINY_DATA, "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=64",
               "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=", "config.DATA.TRAIN.DATA_LIMIT=4",
               "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.DATA.TEST.DATA_LIMIT=4",
               "config.OPTIMIZER.num_epochs=1", "config.DISTRIBUTED.NUM_NODES=1",
               "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.BACKEND=gloo",
               "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=False", f"config.CHECKPOINT.DIR={tmp_path}"]
    assert main(command) == 0
    final = read_final(tmp_path)
    layers = ["conv1", "res2", "res3", "res4", "res5"] + (["res5avg#5", "res5avg#6"] if name == IN1K else ["res5avg"])
    assert [key for key in final if key.startswith("top1/")] == [f"top1/{layer}" for layer in layers]
    assert final["test_images"] == 4


def test_weights_init_takes_a_run_directory_and_skips_the_heads_in_feature_evaluation(tmp_path):
    for step in (3, 12):
        (tmp_path / f"checkpoint_step{step:08d}.torch").write_bytes(b"")
    options = weights_init_options(compose_config([f"config={SYNTHETIC}",
                                                   f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tmp_path}"]))
    assert options["params_file"] == str(tmp_path / "checkpoint_step00000012.torch")
    assert "heads." in options["skip_layers"]
    (tmp_path / "empty").mkdir()
    empty = compose_config([f"config={SYNTHETIC}", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="a directory without checkpoint_step"):
        weights_init_options(empty)
