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


def param_groups(model: nn.Module, weight_decay: float, no_bn_decay: bool) -> list[dict]:
    """Split trainable parameters into decayed and not-decayed groups.

    With ``no_bn_decay`` every 1-D parameter (BatchNorm weights/biases and all biases) skips weight
    decay; the reference splits by the substring "bn" in the name, which misses downsample BNs.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_bn_decay and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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
    return OPTIMIZERS.get(p.algorithm)(param_groups(model, p.weight_decay, p.no_bn_decay), p)


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
    for g in optimizer.param_groups:
        g["lr"] = lr
