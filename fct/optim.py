"""Optimizers and learning-rate schedules (registries; unknown names list the valid ones)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from fct.config import LrPolicyParams, OptimizerParams
from fct.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULES: Registry[Callable[[LrPolicyParams, float, int], Callable[[float], float]]] = Registry(
    "lr schedule"
)


def trunk_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of every backbone trunk inside ``model`` (any wrapper): the modules
    that define ``trunk_parameters()`` (fct's ResNet: all but the classifier; a foreign backbone:
    the timm/torchvision network)."""
    ids: set[int] = set()
    for m in model.modules():
        trunk = getattr(m, "trunk_parameters", None)
        if callable(trunk):
            ids.update(id(p) for p in trunk())
    return ids


def param_groups(model: nn.Module, weight_decay: float, no_bn_decay: bool,
                 backbone_lr_mult: float = 1.0) -> list[dict]:
    """Split trainable parameters into decayed and not-decayed groups, and, when
    ``backbone_lr_mult`` != 1, the trunk's (``lr_mult`` = backbone_lr_mult) from the rest (1).

    With ``no_bn_decay`` every 1-D parameter (BatchNorm weights/biases and all biases) skips weight
    decay; the reference splits by the substring "bn" in the name, which misses downsample BNs.
    Each group's ``lr_mult`` scales the schedule's lr (:func:`set_lr`).
    """
    trunk = trunk_parameter_ids(model) if backbone_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in trunk, no_bn_decay and p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    out = []
    # Order: decayed before not-decayed, head before trunk (the historical single-mult layout first).
    for in_trunk in (False, True):
        for no_decay in (False, True):
            params = groups.get((in_trunk, no_decay), [])
            if not params and (in_trunk or no_decay):
                continue
            out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                        "lr_mult": backbone_lr_mult if in_trunk else 1.0})
    return out


@OPTIMIZERS.register("sgd")
def _sgd(groups: Iterable[dict], p: OptimizerParams) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov)


@OPTIMIZERS.register("adam")
def _adam(groups: Iterable[dict], p: OptimizerParams) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=p.lr)


@OPTIMIZERS.register("adamw")
def _adamw(groups: Iterable[dict], p: OptimizerParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=p.lr)


def build_optimizer(model: nn.Module, p: OptimizerParams) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(p.algorithm)(param_groups(model, p.weight_decay, p.no_bn_decay, p.backbone_lr_mult), p)


def _warmup(lr: float, warmup: int, epoch: float) -> float:
    # Linear ramp reaching lr at the end of the warm-up; epoch 0 starts at lr/warmup as in the
    # reference (per-epoch) and ramps continuously in between when stepping per iteration.
    return lr * min(1.0, (epoch + 1.0) / warmup) if warmup > 0 else lr


@SCHEDULES.register("constant_lr")
def _constant(p: LrPolicyParams, lr: float, epochs: int) -> Callable[[float], float]:
    return lambda e: _warmup(lr, p.warmup_length, e) if e < p.warmup_length else lr


@SCHEDULES.register("cosine_lr")
def _cosine(p: LrPolicyParams, lr: float, epochs: int) -> Callable[[float], float]:
    def f(e: float) -> float:
        if e < p.warmup_length:
            return _warmup(lr, p.warmup_length, e)
        span = max(epochs - p.warmup_length, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (e - p.warmup_length) / span)) * lr

    return f


@SCHEDULES.register("multistep_lr")
def _multistep(p: LrPolicyParams, lr: float, epochs: int) -> Callable[[float], float]:
    adjust = p.lr_adjust

    def f(e: float) -> float:
        if e < p.warmup_length:
            return _warmup(lr, p.warmup_length, e)
        if isinstance(adjust, int):
            n = int(e // adjust)
        else:
            n = sum(1 for m in adjust if e >= m)
        return lr * p.lr_gamma**n

    return f


def build_schedule(p: LrPolicyParams, lr: float, epochs: int) -> Callable[[float], float]:
    """Return ``lr_at(epoch)``: the learning rate at a (fractional) epoch."""
    fn = SCHEDULES.get(p.algorithm)(p, lr, epochs)
    if p.per_step:
        return fn
    return lambda e: fn(float(math.floor(e)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's lr = the schedule's ``lr`` * its ``lr_mult`` (1 unless backbone_lr_mult is set;
    a mult of 1 leaves the lr exactly as given)."""
    for g in optimizer.param_groups:
        mult = g.get("lr_mult", 1.0)
        g["lr"] = lr if mult == 1.0 else lr * mult
