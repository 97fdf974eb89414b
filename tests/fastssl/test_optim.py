import math

import numpy as np
import pytest
import torch
from torch import nn

from fastssl.config import compose_config
from fastssl.optim import LARC, build_optimizer, parameter_groups, precompute_schedule
from fastssl.builder import derive


def test_larc_step_equals_hand_computed_step():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    w0 = layer.weight.detach().clone()
    g = torch.randn(3, 4)
    lr, wd, trust, eps, momentum = 0.5, 1e-4, 0.001, 1e-8, 0.9
    optimizer = build_optimizer(layer, name="sgd", momentum=momentum, nesterov=False, weight_decay=wd,
                                regularize_bn=True, regularize_bias=True, use_larc=True, larc_clip=False,
                                larc_trust_coefficient=trust, larc_eps=eps, eta=0.001, exclude_bias_and_norm=False)
    assert isinstance(optimizer, LARC)
    for group in optimizer.param_groups:
        group["lr"] = lr
    layer.weight.grad = g.clone()
    optimizer.step()
    # By hand: local_lr = trust * |w| / (|g| + wd |w| + eps); update = lr * local_lr * (g + wd w).
    w_norm, g_norm = w0.norm().item(), g.norm().item()
    local_lr = trust * w_norm / (g_norm + wd * w_norm + eps)
    expected = w0 - lr * local_lr * (g + wd * w0)
    assert torch.allclose(layer.weight, expected, atol=1e-7)
    assert optimizer.param_groups[0]["weight_decay"] == wd  # restored after the step


def test_larc_clip_caps_the_factor_at_one():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    optimizer = LARC(torch.optim.SGD(layer.parameters(), lr=1e-6, weight_decay=0.0), trust_coefficient=1.0,
                     clip=True, eps=1e-8)
    layer.weight.grad = torch.full((2, 2), 1e-3)
    optimizer.step()
    # local_lr / lr is huge, so the factor is clipped to 1: a plain SGD step.
    assert torch.allclose(layer.weight, torch.full((2, 2), 1.0 - 1e-6 * 1e-3))


def test_parameter_groups_respect_regularize_flags():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    groups = parameter_groups(model, weight_decay=0.1, regularize_bn=False, regularize_bias=False,
                              exclude_bias_and_norm=False)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3


def test_swav_8node_schedule_at_named_steps():
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet"])
    iterations = 1281167 // 4096
    derived = derive(cfg, world_size=64, num_samples=1281167, iterations_per_epoch=iterations)
    lr = derived.lr_schedule
    total = 400 * iterations
    assert derived.global_batch_size == 4096 and len(lr) == total
    assert lr[0] == pytest.approx(0.6)                       # warmup starts from 0.3 * 512 / 256
    warmup_steps = int(0.025 * total)
    # last warmup step is linear towards the peak 4.8 = 0.3 * 4096 / 256
    assert lr[warmup_steps - 1] == pytest.approx(0.6 + (4.8 - 0.6) * (warmup_steps - 1) / (0.025 * total))
    # first cosine step follows overall progress ("fixed" interval scaling), not a restart at 4.8
    where = warmup_steps / total
    assert lr[warmup_steps] == pytest.approx(0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * where)))
    assert lr[-1] == pytest.approx(0.0048, rel=1e-3)         # cosine ends at 0.001 of the peak
    assert lr.max() <= 4.8 + 1e-9


def test_multistep_and_epoch_interval():
    spec = {"name": "multistep", "values": [0.1, 0.01, 0.001], "milestones": [2, 4]}
    lr = precompute_schedule(spec, total_steps=12, steps_per_epoch=2, update_interval="epoch")
    assert np.allclose(lr, [0.1] * 4 + [0.01] * 4 + [0.001] * 4)


@pytest.mark.parametrize("clip", [False, True])
def test_larc_over_a_whole_group_equals_the_per_parameter_formula(clip):
    """The _foreach step against a loop written from the formula, with a zero gradient and a zero weight."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[2].weight.zero_()  # ||w|| = 0: plain gradient, no decay
    lr, wd, trust, eps = 0.3, 1e-3, 0.02, 1e-8
    grads = [torch.randn_like(p) for p in model.parameters()]
    grads[1].zero_()  # ||g|| = 0: left as it is
    expected = []
    for p, g in zip(model.parameters(), grads):
        w_norm, g_norm = p.detach().norm(), g.norm()
        if w_norm > 0 and g_norm > 0:
            local = trust * w_norm / (g_norm + wd * w_norm + eps)
            local = min(local / lr, 1.0) if clip else local
            g = (g + wd * p.detach()) * local
        expected.append(p.detach() - lr * g)  # SGD without momentum state on the first step
    optimizer = build_optimizer(model, name="sgd", momentum=0.0, nesterov=False, weight_decay=wd, regularize_bn=True,
                                regularize_bias=True, use_larc=True, larc_clip=clip, larc_trust_coefficient=trust,
                                larc_eps=eps, eta=0.001, exclude_bias_and_norm=False)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_a_schedule_of_millions_of_steps_is_built_at_once_and_a_run_beyond_the_bound_is_refused():
    """issue 23: num_epochs=1e8 spent minutes in a Python loop over the steps before training."""
    import time

    from fastssl.config import ConfigError
    from fastssl.run_data import MAX_TOTAL_STEPS

    spec = {"name": "composite", "lengths": [0.1, 0.9], "interval_scaling": ["rescaled", "fixed"],
            "schedulers": [{"name": "linear", "start_value": 0.0, "end_value": 1.0},
                           {"name": "cosine", "start_value": 1.0, "end_value": 0.0}],
            "value": 0.0, "start_value": 0.0, "end_value": 0.0, "values": [], "milestones": []}
    start = time.perf_counter()
    lr = precompute_schedule(spec, total_steps=2_000_000, steps_per_epoch=1000, update_interval="step")
    assert time.perf_counter() - start < 3.0  # the loop took about 40 s on the same machine
    assert lr[0] == 0.0 and lr[100_000] == pytest.approx(0.5) and lr[-1] == pytest.approx(0.0, abs=1e-9)
    assert lr[1_200_000] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.6)))  # fixed: the run's own progress
    cfg = compose_config(["config=pretrain/swav/swav_1node_cpu_resnet18", "config.OPTIMIZER.num_epochs=100000"])
    with pytest.raises(ConfigError, match=f"is {100000 * 400} steps, more than the {MAX_TOTAL_STEPS}"):
        derive(cfg, world_size=1, num_samples=400 * 64, iterations_per_epoch=400)
