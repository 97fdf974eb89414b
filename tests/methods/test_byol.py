"""BYOL against float64 references written from the paper's formulas, LARS against a hand step, and
the method through the entry point (seed configs on meta at full size, CPU runs, 2 ranks, resume)."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fastssl.builder import build_method, derive, run_info
from fastssl.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.config import compose_config
from fastssl.methods.byol import BYOL, target_momentum
from fastssl.models.model import SSLModel
from fastssl.optim import LARS, build_optimizer
from fastssl.run_model import build_run_model, resolve_head_params
from fastssl.train import main
from loaders.batch import Batch
from loaders.recipe import recipe_from_transforms
from rank_harness import run_ranks

B, D = 6, 8


class TinyTrunk(nn.Module):
    feature_dim = 5

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def tiny_byol(num_crops=2, total=100, momentum=0.9):
    torch.manual_seed(0)
    heads = nn.Sequential(nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D)),
                          nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D)))
    model = SSLModel(trunk=TinyTrunk(), heads=heads)
    method = BYOL(momentum=momentum, embedding_dim=D, num_crops=num_crops, total_iterations=total)
    method.bind(model)
    return model, method


def reference_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float64, from the paper: sum over the two directions of mean_b ||p/|p| - z'/|z'| ||^2."""
    p, z = p.double(), z.double()
    total = 0.0
    for i, j in ((0, 1), (1, 0)):
        for b in range(p.shape[1]):
            pn, zn = p[i, b] / p[i, b].norm(), z[j, b] / z[j, b].norm()
            total = total + ((pn - zn) ** 2).sum() / p.shape[1]
    return total


def test_loss_and_gradient_equal_the_formula():
    _, method = tiny_byol()
    p = torch.randn(2 * B, D, requires_grad=True)
    z = torch.randn(2 * B, D)
    batch = Batch(crops=[torch.zeros(B, 3, 4, 4)] * 2, indices=torch.arange(B))
    loss = method.loss((p, z), batch, step=0)
    p64 = p.detach().double().requires_grad_(True)
    expected = reference_loss(p64.view(2, B, D), z.view(2, B, D))
    expected.backward()
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(p.grad.double(), p64.grad, atol=1e-6)


def test_target_momentum_follows_the_cosine_rule_at_named_steps():
    assert target_momentum(0, base=0.996, total_steps=1000) == pytest.approx(0.996)
    assert target_momentum(500, base=0.996, total_steps=1000) == pytest.approx(1 - 0.004 * 0.5)
    assert target_momentum(250, base=0.996, total_steps=1000) == pytest.approx(
        1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert target_momentum(1000, base=0.996, total_steps=1000) == pytest.approx(1.0)


def test_target_update_is_the_ema_of_the_online_parameters_and_gets_no_gradient():
    model, method = tiny_byol(total=10, momentum=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # online moved away from the target copy
    target_before = [p.clone() for p in method.target.parameters()]
    online = list(model.trunk.parameters()) + list(model.heads[0].parameters())
    step = 3
    method.after_step(step=step, model=model)
    tau = 1 - 0.1 * (math.cos(math.pi * step / 10) + 1) / 2
    for before, after, o in zip(target_before, method.target.parameters(), online):
        assert torch.allclose(after, tau * before + (1 - tau) * o, atol=1e-6)
    assert len(target_before) == len(online)  # trunk and projector; the predictor has no target

    batch = Batch(crops=[torch.randn(B, 3, 6, 6), torch.randn(B, 3, 6, 6)], indices=torch.arange(B))
    method.set_train_mode(model)
    method.training_loss(model, batch, step=0).backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    assert all(p.grad is not None for p in model.heads[1].parameters())  # the predictor trains


def test_start_up_description_counts_the_target_network_instead_of_listing_its_statistics():
    model, method = tiny_byol()
    described = method.describe()
    target_parameters = sum(p.numel() for p in model.trunk.parameters()) + sum(
        p.numel() for p in model.heads[0].parameters())
    assert described["target"] == f"{target_parameters:,} parameters, 6 buffers"  # two BatchNorms x 3
    assert not any(key.startswith("target.") for key in described)
    assert described["momentum"] == 0.9 and described["embedding_dim"] == D


def test_multicrop_small_views_predict_both_large_views():
    _, method = tiny_byol(num_crops=4)
    p, z = torch.randn(4 * B, D), torch.randn(2 * B, D)
    batch = Batch(crops=[torch.zeros(B, 3, 4, 4)] * 4, indices=torch.arange(B))
    pv, zv = p.view(4, B, D), z.view(2, B, D)
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    expected = sum(float((2 - 2 * torch.cosine_similarity(pv[i], zv[j], dim=1)).mean()) for i, j in pairs) * 2 / 6
    assert method.loss((p, z), batch, step=0).item() == pytest.approx(expected, rel=1e-5)


def test_lars_step_equals_hand_computed_step_with_bias_and_norm_excluded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    lr, wd, eta, momentum = 0.5, 1e-2, 0.001, 0.9
    optimizer = build_optimizer(model, name="lars", momentum=momentum, nesterov=False, weight_decay=wd,
                                regularize_bn=False, regularize_bias=False, use_larc=False, larc_clip=False,
                                larc_trust_coefficient=0.0, larc_eps=0.0, eta=eta, exclude_bias_and_norm=True)
    assert isinstance(optimizer, LARS)
    for group in optimizer.param_groups:
        group["lr"] = lr
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    optimizer.step()
    w, g = before["0.weight"], grads["0.weight"]
    update = g + wd * w
    trust = eta * w.norm() / update.norm()
    assert torch.allclose(model[0].weight, w - lr * trust * update, atol=1e-7)
    for name in ("0.bias", "1.weight", "1.bias"):  # excluded: no adaptation, no weight decay
        assert torch.allclose(dict(model.named_parameters())[name], before[name] - lr * grads[name], atol=1e-7)


SEED = "pretrain/byol/byol_8node_resnet"


def test_seed_config_builds_on_meta_at_full_size():
    cfg = compose_config([f"config={SEED}"])
    steps = 1281167 // 4096
    derived = derive(cfg, world_size=64, num_samples=1281167, iterations_per_epoch=steps)
    head_params = resolve_head_params(cfg)
    model = build_run_model(cfg, head_params=head_params, on_meta=True)
    method = build_method(cfg, run_info(cfg, derived, rank=0, device=torch.device("meta"), head_params=head_params))
    method.bind(model)
    online = sum(p.numel() for p in model.parameters())
    target = sum(p.numel() for p in method.target.parameters())
    predictor = sum(p.numel() for p in model.heads[1].parameters())
    assert online - predictor == target and predictor > 2_000_000  # 256 -> 4096 -> 256 with BN
    assert derived.lr_schedule.max() == pytest.approx(0.3 * 4096 / 256)
    assert method._taus[0] == pytest.approx(0.99) and method._taus[-1] == pytest.approx(1.0)
    assert cfg.OPTIMIZER.name == "lars" and cfg.OPTIMIZER.exclude_bias_and_norm


CPU = ["config=pretrain/byol/byol_1node_cpu_resnet18", "config.MACHINE.DEVICE=cpu",
       "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
       "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
       "config.DATA.TRAIN.DATA_LIMIT=16", "config.OPTIMIZER.num_epochs=2", "config.LOG_FREQUENCY=1",
       "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]


def read_losses(directory):
    return [json.loads(line)["loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_cpu_run_resumes_exactly_with_its_target_network(tmp_path):
    command = CPU + ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(command + [f"config.CHECKPOINT.DIR={straight}"]) == 0
    resumed.mkdir()
    first = sorted(straight.glob("checkpoint_step*.torch"))[0]
    assert load_checkpoint(first)["step"] == 2
    (resumed / first.name).write_bytes(first.read_bytes())
    assert main(command + [f"config.CHECKPOINT.DIR={resumed}"]) == 0
    assert read_losses(resumed) == read_losses(straight)[2:]
    a, b = (load_checkpoint(latest_checkpoint(d)) for d in (straight, resumed))
    assert any(key.startswith("target.") for key in a["method"])
    for part in ("model", "method"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    # One step on 8 samples: 2 ranks x 4 with SyncBN over both, against 1 x 8.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one_step = CPU + ["config.DATA.TRAIN.DATA_LIMIT=8", "config.OPTIMIZER.num_epochs=1"]
    two = one_step + ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
                      f"config.CHECKPOINT.DIR={tmp_path / 'two'}"]

    def rank_main(rank, world_size):
        return main(two)
    assert run_ranks(rank_main, world_size=2, init_group=False, deadline_s=120) == [0, 0]
    assert main(one_step + ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", f"config.CHECKPOINT.DIR={tmp_path / 'one'}"]) == 0
    saved = {name: load_checkpoint(latest_checkpoint(tmp_path / name)) for name in ("one", "two")}
    assert read_losses(tmp_path / "one")[0] == pytest.approx(read_losses(tmp_path / "two")[0], rel=1e-4)
    for part in ("model", "method"):
        for key, value in saved["one"][part].items():
            other = saved["two"][part][key]
            if value.is_floating_point():
                assert (value - other).abs().max() <= 1e-4 * value.abs().max() + 1e-6, key


def test_seed_recipe_resolves_to_the_papers_asymmetric_views():
    """BYOL paper, table 6: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2, blur 1.0 / 0.1, solarize 0.0 / 0.2."""
    cfg = compose_config([f"config={SEED}"])
    recipe = recipe_from_transforms(OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS))
    first, second = recipe.augmentations
    for view in (first, second):
        assert view.brightness == pytest.approx((0.6, 1.4)) and view.contrast == pytest.approx((0.6, 1.4))
        assert view.saturation == pytest.approx((0.8, 1.2)) and view.hue == pytest.approx((-0.1, 0.1))
        assert (view.jitter_p, view.gray_p, view.flip_p) == pytest.approx((0.8, 0.2, 0.5))
    assert (first.blur_p, second.blur_p) == pytest.approx((1.0, 0.1))
    assert (first.solarize_p, second.solarize_p) == pytest.approx((0.0, 0.2))
    assert recipe.crop_sizes == [224, 224] and recipe.mean == pytest.approx((0.485, 0.456, 0.406))
    assert recipe.interpolation == "bicubic"  # VISSL's BYOL files and DeepMind's (interpolation: 3)


def test_linear_protocols_headline_classifier_is_a_plain_linear_layer_on_res5avg():
    """BYOL paper and DeepMind's byol: a linear layer on the pooled res5 features, no BatchNorm before it."""
    cfg = compose_config(["config=benchmark/linear_image_classification/imagenet1k/byol_transfer_in1k_linear"])
    model = build_run_model(cfg, head_params=resolve_head_params(cfg), on_meta=True)
    last = model.heads[-1]
    assert [type(layer) for layer in last] == [nn.Linear] and last[0].weight.shape == (1000, 2048)
    assert cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP[-1][0] == "res5avg"
    train = recipe_from_transforms(OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS))
    assert train.interpolation == "bicubic"


def test_head_lr_multipliers_scale_each_heads_lr_and_resume_takes_the_configs(tmp_path, capsys):
    """OPTIMIZER.head_lr_multipliers: the predictor's groups step at 10x the scheduled LR (LARS exclusions
    kept per multiplier); a resumed run uses the config's multipliers, not the checkpoint's."""
    command = CPU + ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", f"config.CHECKPOINT.DIR={tmp_path}"]
    assert main(command + ["config.OPTIMIZER.head_lr_multipliers=[1,10]", "config.OPTIMIZER.num_epochs=1"]) == 0
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    groups = saved["optimizer"]["param_groups"]
    cfg = compose_config(command + ["config.OPTIMIZER.num_epochs=1"])
    head_params = resolve_head_params(cfg, quiet=True)
    model = build_run_model(cfg, head_params=head_params)
    predictor = len(list(model.heads[1].parameters()))
    scaled = [g for g in groups if g["lr_scale"] == 10.0]
    assert sum(len(g["params"]) for g in scaled) == predictor
    assert {g["adapt"] for g in scaled} == {True, False}  # its biases and BatchNorm stay excluded
    base = next(g["lr"] for g in groups if g["lr_scale"] == 1.0)
    assert base > 0 and all(g["lr"] == pytest.approx(10 * base) for g in scaled)
    # Resumed for a second epoch with another multiplier: the config's value is the one used.
    assert main(command + ["config.OPTIMIZER.head_lr_multipliers=[1,3]"]) == 0
    resumed = load_checkpoint(latest_checkpoint(tmp_path))
    assert resumed["step"] > saved["step"]
    base = next(g["lr"] for g in resumed["optimizer"]["param_groups"] if g["lr_scale"] == 1.0)
    assert [g["lr"] for g in resumed["optimizer"]["param_groups"] if g["lr_scale"] != 1.0] == \
        pytest.approx([3 * base] * len(scaled))
    # Resuming with another grouping (no multipliers: the predictor's groups merge into the trunk's) is a
    # one-line error that leaves the checkpoints as they were.
    before = sorted(p.name for p in tmp_path.glob("checkpoint_step*.torch"))
    capsys.readouterr()
    assert main(command + ["config.OPTIMIZER.head_lr_multipliers=[]", "config.OPTIMIZER.num_epochs=3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "parameter groups" in error and "head_lr_multipliers" in error
    assert sorted(p.name for p in tmp_path.glob("checkpoint_step*.torch")) == before
    # A wrong length is a one-line error before anything runs.
    assert main(command + ["config.OPTIMIZER.head_lr_multipliers=[10]", "--cfg", "job"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "head_lr_multipliers" in error[0] and "2 positive numbers" in error[0]
