"""Learning-rate schedules and parameter groups against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from fct.config import LrPolicyParams, OptimizerParams
from fct.errors import ConfigError
from fct.optim import build_optimizer, build_schedule, param_groups


def test_cosine_with_warmup_by_hand():
    f = build_schedule(LrPolicyParams("cosine_lr", warmup_length=5), lr=1.0, epochs=105)
    assert f(0) == pytest.approx(0.2)  # (0+1)/5
    assert f(4) == pytest.approx(1.0)
    assert f(2.5) == pytest.approx(0.7)  # per-step: (2.5+1)/5
    assert f(5) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)  # halfway through the cosine
    assert f(105) == pytest.approx(0.0, abs=1e-12)
    assert f(30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))


def test_per_epoch_mode_matches_reference_steps():
    f = build_schedule(LrPolicyParams("cosine_lr", warmup_length=5, per_step=False), lr=1.0, epochs=105)
    assert f(2.9) == f(2.0) == pytest.approx(0.6)


def test_constant_and_multistep():
    c = build_schedule(LrPolicyParams("constant_lr", warmup_length=2), lr=0.4, epochs=10)
    assert [c(e) for e in (0, 1, 2, 9)] == pytest.approx([0.2, 0.4, 0.4, 0.4])
    m = build_schedule(LrPolicyParams("multistep_lr", lr_adjust=30, lr_gamma=0.1), lr=1.0, epochs=90)
    assert [m(e) for e in (0, 29.9, 30, 61)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    ms = build_schedule(LrPolicyParams("multistep_lr", lr_adjust=[3, 8], lr_gamma=0.5), lr=1.0, epochs=10)
    assert [ms(e) for e in (2, 3, 7, 8)] == pytest.approx([1.0, 0.5, 0.5, 0.25])
    with pytest.raises(ConfigError, match="lr_adjust"):
        LrPolicyParams("multistep_lr")


def test_no_bn_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    g = param_groups(model, 0.1, no_bn_decay=True)
    assert [len(x["params"]) for x in g] == [2, 4]  # conv.w, lin.w | conv.b, bn.w, bn.b, lin.b
    assert g[1]["weight_decay"] == 0.0


def test_build_optimizers():
    model = nn.Linear(3, 2)
    for algo, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(model, OptimizerParams(algo, lr=0.1, weight_decay=0.01))
        assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 0.01
