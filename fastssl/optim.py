"""SGD with LARC, VISSL's parameter groups, and learning-rate schedules precomputed per step."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, *, weight_decay: float, regularize_bn: bool, regularize_bias: bool,
                     exclude_bias_and_norm: bool, lr_scales: dict[int, float] | None = None) -> list[dict]:
    """Split parameters as VISSL does: weight-decayed or not (regularize_bn / regularize_bias), for
    LARS adapted or not (exclude_bias_and_norm: biases and normalisation layers keep their plain step),
    and by LR multiplier (``lr_scales``: id(parameter) -> multiplier of the scheduled LR, 1 if absent).

    Returns param groups for torch.optim.SGD or LARS; each carries an ``adapt`` flag (read by LARS) and
    an ``lr_scale`` (read by the loop, which sets the group's LR to the schedule's value times it).
    """
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, bool, float], list] = {}
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_bn = isinstance(module, _NORM_LAYERS)
            is_bias = name == "bias"
            decayed = not ((is_bn and not regularize_bn) or (is_bias and not regularize_bias))
            adapted = not (exclude_bias_and_norm and (is_bn or is_bias))
            groups.setdefault((decayed, adapted, float(lr_scales.get(id(param), 1.0))), []).append(param)
    flags = [(True, True), (False, True), (True, False), (False, False)]
    order = [(*flag, scale) for scale in sorted({key[2] for key in groups} | {1.0}) for flag in flags]
    return [{"params": groups.get(key, []), "weight_decay": weight_decay if key[0] else 0.0, "adapt": key[1],
             "lr_scale": key[2]}
            for key in order if key in groups or key == (True, True, 1.0)]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as BYOL trains with it (byol.txt, point 5; VISSL's ``lars``):

        g' = g + wd * w;  trust = eta * ||w|| / ||g'|| (1 where either norm is 0);
        mu <- momentum * mu + trust * g';  w <- w - lr * mu.

    Parameters of a group with ``adapt`` False (biases and BatchNorm with exclude_bias_and_norm) take
    the plain momentum step (trust 1); their weight decay is the group's (0 when regularize_bn /
    regularize_bias are off, as the BYOL recipe sets). No host synchronisation (torch.where).
    """

    def __init__(self, params, *, momentum: float, eta: float):
        super().__init__(params, {"lr": 0.0, "momentum": momentum, "eta": eta, "weight_decay": 0.0, "adapt": True})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])


class LARC:
    """Layer-wise adaptive rate control around an optimizer (You et al. 2017; the semantics of Apex's LARC).

    Per parameter with a gradient: local_lr = trust * ||w|| / (||g|| + wd * ||w|| + eps). With clip the
    factor is min(local_lr / lr, 1) ("clip" mode), otherwise local_lr ("scale" mode). Weight decay is
    folded into the gradient before scaling and the wrapped optimizer's own decay is switched off for the
    step. A parameter whose weight or gradient norm is zero keeps its plain gradient and gets no decay.
    Computed without host synchronisation (torch.where instead of Python branches), as _foreach operations
    over each parameter group rather than a Python loop of small kernels.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, trust_coefficient: float, clip: bool, eps: float):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    @property
    def param_groups(self):
        return self.optim.param_groups

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state):
        self.optim.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True):
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        saved_decay = []
        for group in self.optim.param_groups:
            weight_decay = group["weight_decay"]
            saved_decay.append(weight_decay)
            group["weight_decay"] = 0.0
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._scale_gradients(params, weight_decay=weight_decay, lr=group["lr"])
        self.optim.step()
        for group, weight_decay in zip(self.optim.param_groups, saved_decay):
            group["weight_decay"] = weight_decay

    def _scale_gradients(self, params: list, *, weight_decay: float, lr: float) -> None:
        """g <- (g + wd w) * local_lr for every parameter of a group at once (_foreach operations)."""
        grads = [p.grad for p in params]
        param_norms = torch.stack(torch._foreach_norm(params)).float()  # (P,)
        grad_norms = torch.stack(torch._foreach_norm(grads)).float()  # (P,)
        adaptive = self.trust_coefficient * param_norms / (grad_norms + param_norms * weight_decay + self.eps)
        if self.clip:
            adaptive = torch.clamp(adaptive / lr, max=1.0)
        active = (param_norms > 0) & (grad_norms > 0)
        factors = torch.where(active, adaptive, torch.ones_like(adaptive))
        decays = torch.where(active, torch.full_like(adaptive, weight_decay), torch.zeros_like(adaptive))
        torch._foreach_add_(grads, torch._foreach_mul(params, list(decays.to(grads[0].dtype).unbind())))
        torch._foreach_mul_(grads, list(factors.to(grads[0].dtype).unbind()))


def build_optimizer(model: nn.Module, *, name: str, momentum: float, nesterov: bool, weight_decay: float,
                    regularize_bn: bool, regularize_bias: bool, use_larc: bool, larc_clip: bool,
                    larc_trust_coefficient: float, larc_eps: float, eta: float, exclude_bias_and_norm: bool,
                    lr_scales: dict[int, float] | None = None):
    """SGD (optionally wrapped in LARC, VISSL's SwAV recipes) or LARS (BYOL) over VISSL's parameter groups.
    The LR is set per step by the loop (times each group's ``lr_scale``, from ``lr_scales``)."""
    if name not in ("sgd", "lars"):
        raise ValueError(f"config.OPTIMIZER.name {name!r} is not supported (sgd, with use_larc for LARC; lars)")
    if name == "sgd" and exclude_bias_and_norm:
        raise ValueError("config.OPTIMIZER.exclude_bias_and_norm applies to lars (sgd excludes with regularize_bn / "
                         "regularize_bias, LARC adapts every parameter)")
    groups = parameter_groups(model, weight_decay=weight_decay, regularize_bn=regularize_bn,
                              regularize_bias=regularize_bias, exclude_bias_and_norm=exclude_bias_and_norm,
                              lr_scales=lr_scales)
    if name == "lars":
        if use_larc or nesterov:
            raise ValueError("config.OPTIMIZER.name lars takes neither use_larc nor nesterov")
        return LARS(groups, momentum=momentum, eta=eta)
    sgd = torch.optim.SGD(groups, lr=0.0, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if use_larc:
        return LARC(sgd, trust_coefficient=larc_trust_coefficient, clip=larc_clip, eps=larc_eps)
    return sgd


# ----------------------------------------------------------------------------------------------
# Schedules: a value for every point of training progress `where` in [0, 1), the semantics of
# ClassyVision's param schedulers that VISSL uses.

MAX_LR = 100.0  # far above any published recipe's peak LR (LARS at batch 32k: about 10)


def _schedule_values(spec: dict, where: np.ndarray, epoch: np.ndarray) -> np.ndarray:
    """The schedule at every (where, epoch) pair, (N,) float64 each: whole arrays at once, so a schedule of
    millions of steps takes milliseconds."""
    name = spec["name"]
    if name == "constant":
        return np.full(where.shape, float(spec["value"]))
    if name == "linear":
        return spec["start_value"] + where * (spec["end_value"] - spec["start_value"])
    if name == "cosine":
        return spec["end_value"] + 0.5 * (spec["start_value"] - spec["end_value"]) * (1 + np.cos(np.pi * where))
    if name == "multistep":
        passed = (epoch[:, None] >= np.asarray(spec["milestones"], dtype=np.int64)[None, :]).sum(axis=1)
        return np.asarray(spec["values"], dtype=np.float64)[passed]
    if name == "composite":
        lengths = spec["lengths"]
        ends = np.cumsum(lengths)  # the same running sums as adding the lengths one by one
        part = np.minimum(np.searchsorted(ends, where, side="right"), len(lengths) - 1)
        values = np.empty(where.shape)
        for index, (length, sub) in enumerate(zip(lengths, spec["schedulers"])):
            mask = part == index
            start = ends[index - 1] if index else 0.0
            scaling = spec["interval_scaling"][index] if spec["interval_scaling"] else "rescaled"
            local = (where[mask] - start) / length if scaling == "rescaled" else where[mask]
            values[mask] = _schedule_values(sub, local, epoch[mask])
        return values
    raise ValueError(f"unknown schedule name {name!r} (constant, linear, cosine, multistep, composite)")


def check_schedule(spec: dict) -> None:
    """Raise ValueError (one line) for an ill-formed schedule before training starts: a learning rate is a finite
    number in [0, MAX_LR] (a negative or infinite one would train silently to nothing)."""
    name = spec["name"]
    used = {"constant": ["value"], "linear": ["start_value", "end_value"], "cosine": ["start_value", "end_value"],
            "multistep": ["values"]}.get(name, [])
    for key in used:
        for value in (spec[key] if key == "values" else [spec[key]]):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_LR):
                raise ValueError(f"the LR schedule's {key} {value!r} must be a finite number in [0, {MAX_LR}]")
    if name == "composite":
        subs, lengths = spec["schedulers"], spec["lengths"]
        if not subs or len(subs) != len(lengths):
            raise ValueError("composite schedule needs as many lengths as schedulers")
        if abs(sum(lengths) - 1.0) > 1e-6:
            raise ValueError(f"composite schedule lengths must sum to 1, got {sum(lengths)}")
        if spec["interval_scaling"] and len(spec["interval_scaling"]) != len(subs):
            raise ValueError("composite schedule needs one interval_scaling entry per scheduler")
        for sub in subs:
            check_schedule({**spec, **sub, "schedulers": [], "lengths": []})
    elif name == "multistep" and len(spec["values"]) != len(spec["milestones"]) + 1:
        raise ValueError("multistep schedule needs len(values) == len(milestones) + 1")
    elif name not in ("constant", "linear", "cosine", "multistep"):
        raise ValueError(f"unknown schedule name {name!r} (constant, linear, cosine, multistep, composite)")


def precompute_schedule(spec: dict, *, total_steps: int, steps_per_epoch: int, update_interval: str) -> np.ndarray:
    """The value at every global step, as an array (indexed by step in the loop, no per-step logic)."""
    check_schedule(spec)
    step = np.arange(total_steps, dtype=np.int64)
    epoch = step // steps_per_epoch
    where = (epoch * steps_per_epoch if update_interval == "epoch" else step) / total_steps
    return _schedule_values(spec, where, epoch)


def scale_lr_schedule(spec: dict, *, base_value: float, base_lr_batch_size: int, global_batch: int,
                      batch_per_node: int, scaling_type: str) -> dict:
    """VISSL's auto_lr_scaling (vissl/utils/hydra_config.py: infer_learning_rate, get_scaled_lr_scheduler,
    resolve_linear_schedule): the peak LR becomes base_value * f, where f = global_batch / base_lr_batch_size
    (scaling_type linear, Goyal et al. 2017) or sqrt(f) (scaling_type sqrt).

    Cosine keeps its end/start ratio, multistep its decay factor (rounded to 6 decimals, the values to 8,
    as VISSL does), linear ends at and constant becomes the scaled value. In a composite schedule every
    linear part is a warm-up: it ends at the scaled value and starts from the LR scaled linearly to one
    node's batch, base_value * batch_per_node / base_lr_batch_size. On one node (global_batch ==
    batch_per_node) a warm-up that would not rise is removed, and a composite left with one part becomes
    that part over the whole run: with linear scaling a one-node warm-up + cosine is a full-length cosine.
    """
    if scaling_type not in ("linear", "sqrt"):
        raise ValueError(f"auto_lr_scaling.scaling_type must be linear or sqrt, got {scaling_type!r}")
    factor = global_batch / base_lr_batch_size
    scaled = base_value * (math.sqrt(factor) if scaling_type == "sqrt" else factor)
    warmup_start = base_value * batch_per_node / base_lr_batch_size
    return _scaled_schedule(spec, scaled=scaled, warmup_start=warmup_start, one_node=global_batch <= batch_per_node)


def _scaled_schedule(spec: dict, *, scaled: float, warmup_start: float, one_node: bool) -> dict:
    spec = {**spec}
    name = spec["name"]
    if name == "cosine":
        ratio = spec["end_value"] / spec["start_value"]
        spec.update(start_value=scaled, end_value=scaled * ratio)
    elif name == "linear":
        spec.update(end_value=scaled)
    elif name == "constant":
        spec.update(value=scaled)
    elif name == "multistep":
        values = spec["values"]
        gamma = round(values[1] / values[0], 6) if len(values) > 1 else 1.0
        spec.update(values=[round(scaled * gamma ** i, 8) for i in range(len(values))])
    elif name == "composite":
        subs = [_scaled_schedule({**spec, **sub, "schedulers": [], "lengths": []}, scaled=scaled,
                                 warmup_start=warmup_start, one_node=one_node) for sub in spec["schedulers"]]
        warmups = [index for index, sub in enumerate(subs) if sub["name"] == "linear"]
        for index in warmups:
            subs[index]["start_value"] = warmup_start
        flat = [index for index in warmups if one_node and subs[index]["start_value"] <= subs[index]["end_value"]]
        if flat:  # VISSL removes the last such warm-up only
            del subs[flat[-1]]
            if len(subs) == 1:
                return subs[0]
            raise ValueError(f"auto_lr_scaling removed the composite schedule's one-node warm-up (it would not "
                             f"rise), leaving {len(subs)} schedulers for {len(spec['lengths'])} lengths; VISSL "
                             f"stops here too: remove the warm-up and its length from the config")
        spec.update(schedulers=subs)
    return spec
