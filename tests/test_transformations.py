"""Transformations h (FCT/FastFill heads), their losses, configs and the transformed-old model file."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from fct.config import (
    DiscriminativeLossParams,
    ObjectiveParams,
    TransformationArchParams,
    UncertaintyLossParams,
    check_objective_fits_arch,
    from_dict,
)
from fct.errors import ConfigError, UserError
from fct.models import (
    BackboneOutput,
    TorchScriptPart,
    TransformedOldModel,
    build_backbone,
    load_model_file,
    model_num_params,
    read_model_file,
    save_model_file,
    save_transformation,
    save_transformed_old_model,
)
from fct.transformations import TRANSFORMATIONS, TransformationOutput, build_transformation, uncertainty_score
from fct.transformations.losses import similarity_loss, similarity_per_sample, transformation_loss

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

SMALL = {"old_embedding_dim": 6, "new_embedding_dim": 5, "side_info_dim": 4, "inner_dim": 16}
HEADS = [("MLP_BN_SIDE_PROJECTION", 1), ("MLP_BN_SIDE_PROJECTION_SIGMA", 1),
         ("MLP_BN_SIDE_PROJECTION_SIGMA", 5), ("LINEAR", 1)]
from helpers import REPO


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def objective(**sections) -> ObjectiveParams:
    return from_dict(ObjectiveParams, sections, source="test")


# ------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert TRANSFORMATIONS.names() == ["LINEAR", "MLP_BN_SIDE_PROJECTION", "MLP_BN_SIDE_PROJECTION_SIGMA"]


@pytest.mark.parametrize("arch,sigma_dim", HEADS)
@pytest.mark.parametrize("with_side", [True, False])
def test_head_shapes_and_every_parameter_gets_a_gradient(arch: str, sigma_dim: int, with_side: bool) -> None:
    dims = dict(SMALL, side_info_dim=4 if with_side else None)
    h = build_transformation(arch, sigma_dim=sigma_dim, **dims).train()
    old = torch.randn(8, 6)
    side = torch.randn(8, 4) if with_side else None
    out = h(old, side)
    assert isinstance(out, TransformationOutput) and out.feature.shape == (8, 5)
    if arch.endswith("SIGMA"):
        assert h.has_uncertainty and h.sigma_dim == sigma_dim
        assert out.log_variance is not None and out.log_variance.shape == (8, sigma_dim)
        assert uncertainty_score(out.log_variance).shape == (8,)
    else:
        assert not h.has_uncertainty and h.sigma_dim == 0 and out.log_variance is None
    loss = out.feature.square().sum() + (0 if out.log_variance is None else out.log_variance.sum())
    loss.backward()
    for name, p in h.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # reference TorchScript features arrive as (N, D, 1, 1)
    pooled = h(old[:, :, None, None], None if side is None else side[:, :, None, None])
    torch.testing.assert_close(pooled.feature, h(old, side).feature)


@pytest.mark.parametrize("arch,sigma_dim", HEADS)
def test_batch_of_one_in_train_and_eval_mode(arch: str, sigma_dim: int) -> None:
    h = build_transformation(arch, sigma_dim=sigma_dim, **SMALL).train()
    old, side = torch.randn(16, 6), torch.randn(16, 4)
    h(old, side)  # a batch > 1 moves the running statistics away from their init
    bns = [m for m in h.modules() if isinstance(m, nn.BatchNorm1d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    one = h(old[:1], side[:1])  # would raise in plain BatchNorm1d
    for m, (mean, var, n) in zip(bns, before):  # a batch of one leaves the statistics untouched
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, n)
    one.feature.sum().backward()
    h.eval()
    with torch.no_grad():
        ev = h(old[:1], side[:1])
        batch = h(old, side)
    torch.testing.assert_close(one.feature.detach(), ev.feature)  # train-mode N=1 == eval mode
    torch.testing.assert_close(batch.feature[:1], ev.feature)  # eval mode: no batch dependence
    if sigma_dim and arch.endswith("SIGMA"):
        torch.testing.assert_close(one.log_variance.detach(), ev.log_variance)


def test_reference_shape_parameter_count() -> None:
    o = n = s = 128
    inner = 2048

    def block(i: int, j: int) -> int:  # linear without bias + BatchNorm (weight, bias)
        return i * j + 2 * j

    fct = (block(o, 2 * o) + block(2 * o, 2 * n) + block(s, 2 * s) + block(2 * s, 2 * n)
           + block(4 * n, inner) + block(inner, inner) + inner * n + n)
    assert fct == 5_712_000  # "about 5.7M" (protocols.md §3)
    dims = {"old_embedding_dim": o, "new_embedding_dim": n, "side_info_dim": s, "inner_dim": inner}
    assert model_num_params(build_transformation("MLP_BN_SIDE_PROJECTION", **dims)) == fct
    assert model_num_params(build_transformation("MLP_BN_SIDE_PROJECTION_SIGMA", **dims)) == fct + inner + 1
    assert (model_num_params(build_transformation("MLP_BN_SIDE_PROJECTION_SIGMA", sigma_dim=n, **dims))
            == fct + inner * n + n)
    assert model_num_params(build_transformation("LINEAR", **dims)) == (o + s) * n + n


def test_build_errors() -> None:
    with pytest.raises(ConfigError, match="MLP_BN_SIDE_PROJECTION_SIGMA") as info:
        build_transformation("MLP_BN_SIDE_PROJECTON", **SMALL)
    assert "did you mean" in str(info.value) and "LINEAR" in str(info.value)
    with pytest.raises(ConfigError, match="inner_dims, width"):
        build_transformation("LINEAR", inner_dims=3, width=2, **SMALL)
    with pytest.raises(ConfigError, match="arch_params.inner_dim"):
        build_transformation("LINEAR", **dict(SMALL, inner_dim=0))
    with pytest.raises(ConfigError, match="arch_params.old_embedding_dim"):
        build_transformation("LINEAR", **dict(SMALL, old_embedding_dim=True))
    with pytest.raises(ConfigError, match="arch_params.side_info_dim"):
        build_transformation("LINEAR", **dict(SMALL, side_info_dim=2.0))
    with pytest.raises(ConfigError, match="sigma_dim must be 1 .* or new_embedding_dim=5"):
        build_transformation("MLP_BN_SIDE_PROJECTION_SIGMA", sigma_dim=3, **SMALL)
    with pytest.raises(ConfigError, match="predicts no uncertainty"):
        build_transformation("MLP_BN_SIDE_PROJECTION", sigma_dim=5, **SMALL)


def test_input_errors() -> None:
    h = build_transformation("MLP_BN_SIDE_PROJECTION", **SMALL).eval()
    with pytest.raises(UserError, match="old features of width 6, got 7"):
        h(torch.randn(2, 7), torch.randn(2, 4))
    with pytest.raises(UserError, match="side_info_dim=4 differs from old_embedding_dim=6"):
        h(torch.randn(2, 6), None)
    with pytest.raises(UserError, match="not images"):
        h(torch.randn(2, 3, 8, 8), torch.randn(2, 4))
    with pytest.raises(UserError, match="2 samples but side-information features 3"):
        h(torch.randn(2, 6), torch.randn(3, 4))


def test_side_none_feeds_the_old_feature_to_the_side_branch() -> None:
    h = build_transformation("MLP_BN_SIDE_PROJECTION", **dict(SMALL, side_info_dim=6)).eval()
    old = torch.randn(3, 6)
    torch.testing.assert_close(h(old, None).feature, h(old, old).feature)


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------

H = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
T = torch.tensor([[0.0, 0.0], [1.0, 1.0]])


def test_similarity_losses_by_hand() -> None:
    # mse: per sample ((1)^2 + 2^2)/2 = 2.5, (2^2 + 3^2)/2 = 6.5
    torch.testing.assert_close(similarity_per_sample("mse", H, T), torch.tensor([2.5, 6.5]))
    torch.testing.assert_close(similarity_loss("mse", H, T), torch.tensor(4.5))
    torch.testing.assert_close(similarity_loss("mse", H, T), nn.functional.mse_loss(H, T))
    torch.testing.assert_close(similarity_per_sample("l1", H, T), torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(similarity_loss("l1", H, T), torch.tensor(2.0))
    # the real cosine: cos([3,4], [4,3]) = 24/25 (an L1 normalisation would give 24/49)
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [1.0, 1.0]])
    torch.testing.assert_close(similarity_per_sample("cosine", a, b), torch.tensor([1 - 24 / 25, 1 - 1 / math.sqrt(2)]))
    torch.testing.assert_close(similarity_loss("cosine", a, 7.0 * a), torch.tensor(0.0), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="unknown similarity loss 'mae'.*valid: cosine, l1, mse"):
        similarity_loss("mae", H, T)


def _ce_by_hand(logits: list[float], label: int, eps: float) -> float:
    z = max(logits)
    log_norm = z + math.log(sum(math.exp(v - z) for v in logits))
    logp = [v - log_norm for v in logits]
    return (1 - eps) * -logp[label] + eps * -sum(logp) / len(logp)


def _classifier() -> nn.Linear:
    clf = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -0.5]]))
    return clf


def test_discriminative_losses_by_hand() -> None:
    clf = _classifier()
    labels = torch.tensor([2, 0])
    logits = (H @ clf.weight.T).tolist()  # [[1, 2, -0.5], [3, 4, -0.5]]
    out = TransformationOutput(H, None)
    for name, section, eps in (("LabelSmoothing", {"name": "LabelSmoothing"}, 0.1),
                               ("LabelSmoothing", {"name": "LabelSmoothing", "label_smoothing": 0.3}, 0.3),
                               ("CE", {"name": "CE"}, 0.0)):
        params = objective(similarity_loss={"mu_similarity": 2.0}, discriminative_loss=dict(section, mu_disc=0.5))
        ce = [_ce_by_hand(logits[i], int(labels[i]), eps) for i in range(2)]
        loss, stats = transformation_loss(out, T, labels, clf, params)
        expected = 2.0 * 4.5 + 0.5 * sum(ce) / 2
        assert loss.item() == pytest.approx(expected, rel=1e-5), name
        assert stats["discriminative"] == pytest.approx(sum(ce) / 2, rel=1e-5)
        assert stats["similarity"] == pytest.approx(4.5) and stats["loss"] == pytest.approx(expected, rel=1e-5)
        assert set(stats) == {"loss", "similarity", "discriminative"}


def test_frozen_classifier_gets_no_gradient_but_h_does() -> None:
    clf = build_backbone("CifarResNet20", num_classes=3, embedding_dim=5).classifier
    assert clf.weight.requires_grad  # frozen by the loss, not by the caller
    h = build_transformation("MLP_BN_SIDE_PROJECTION", **SMALL).train()
    out = h(torch.randn(4, 6), torch.randn(4, 4))
    params = objective(similarity_loss={"mu_similarity": 0.0}, discriminative_loss={})
    loss, _ = transformation_loss(out, torch.randn(4, 5), torch.tensor([0, 1, 2, 0]), clf, params)
    loss.backward()
    assert clf.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())


def test_uncertainty_loss_by_hand_sigma_dim_1() -> None:
    clf = _classifier()
    labels = torch.tensor([1, 2])
    s = torch.tensor([[0.3], [-0.7]], requires_grad=True)
    out = TransformationOutput(H, s)
    params = objective(similarity_loss={"name": "l1", "mu_similarity": 1.0},
                       discriminative_loss={"mu_disc": 1.0}, uncertainty_loss={"mu_uncertainty": 0.5})
    logits = (H @ clf.weight.T).tolist()
    sim = [1.5, 2.5]
    li = [sim[i] + _ce_by_hand(logits[i], int(labels[i]), 0.1) for i in range(2)]
    s_ = [0.3, -0.7]
    expected = sum(0.5 * math.exp(-s_[i]) * li[i] + 0.5 * s_[i] for i in range(2)) / 2
    loss, stats = transformation_loss(out, T, labels, clf, params)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["log_variance"] == pytest.approx(-0.2) and stats["similarity"] == pytest.approx(2.0)
    # d/ds_i = (-0.5 exp(-s_i) L_i + mu) / N
    loss.backward()
    grad = [(-0.5 * math.exp(-s_[i]) * li[i] + 0.5) / 2 for i in range(2)]
    torch.testing.assert_close(s.grad, torch.tensor([[grad[0]], [grad[1]]]))


def test_uncertainty_optimum_is_log_of_the_loss() -> None:
    # with mu_unc = 0.5, argmin_s 0.5 exp(-s) L + 0.5 s is s = log L
    target = torch.zeros(1, 2)
    feature = torch.tensor([[1.0, 3.0]])  # mse per sample = 5
    s = torch.tensor([[math.log(5.0)]], requires_grad=True)
    loss, _ = transformation_loss(TransformationOutput(feature, s), target, None, None,
                                  objective(uncertainty_loss={}))
    loss.backward()
    assert abs(s.grad.item()) < 1e-6


@pytest.mark.parametrize("sim_name", ["mse", "cosine"])
def test_uncertainty_loss_by_hand_per_dimension(sim_name: str) -> None:
    clf = _classifier()
    labels = torch.tensor([0, 1])
    target = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    s_ = [[0.1, -0.2], [0.4, 0.0]]
    out = TransformationOutput(H, torch.tensor(s_))
    params = objective(similarity_loss={"name": sim_name, "mu_similarity": 0.5},
                       discriminative_loss={"name": "CE", "mu_disc": 2.0}, uncertainty_loss={"mu_uncertainty": 0.25})
    logits = (H @ clf.weight.T).tolist()
    total = 0.0
    for i in range(2):
        ce = _ce_by_hand(logits[i], int(labels[i]), 0.0)
        for k in range(2):
            if sim_name == "mse":
                sim = (H[i, k] - target[i, k]).item() ** 2  # per-dimension term
            else:  # no per-dimension term: the per-sample cosine loss for every k
                hv, tv = H[i].tolist(), target[i].tolist()
                dot = sum(a * b for a, b in zip(hv, tv))
                sim = 1 - dot / (math.hypot(*hv) * math.hypot(*tv))
            lik = 0.5 * sim + 2.0 * ce
            total += 0.5 * math.exp(-s_[i][k]) * lik + 0.25 * s_[i][k]
    loss, _ = transformation_loss(out, target, labels, clf, params)
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)


def test_per_dimension_loss_with_equal_log_variances_equals_per_sample_loss() -> None:
    params = objective(uncertainty_loss={})
    s1 = torch.tensor([[0.3], [-0.5]])
    one, _ = transformation_loss(TransformationOutput(H, s1), T, None, None, params)
    many, _ = transformation_loss(TransformationOutput(H, s1.expand(2, 2)), T, None, None, params)
    torch.testing.assert_close(one, many)


def test_plain_fct_loss_and_stats() -> None:
    loss, stats = transformation_loss(TransformationOutput(H, None), T, None, None, ObjectiveParams())
    assert loss.item() == pytest.approx(4.5) and stats == {"loss": 4.5, "similarity": 4.5}


def test_loss_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="uncertainty_loss needs a transformation that predicts"):
        transformation_loss(TransformationOutput(H, None), T, None, None, objective(uncertainty_loss={}))
    with pytest.raises(ConfigError, match="needs the new model's classifier"):
        transformation_loss(TransformationOutput(H, None), T, torch.tensor([0, 1]), None,
                            objective(discriminative_loss={}))
    with pytest.raises(ConfigError, match="needs the labels"):
        transformation_loss(TransformationOutput(H, None), T, None, _classifier(), objective(discriminative_loss={}))
    with pytest.raises(ConfigError, match="new_embedding_dim"):
        transformation_loss(TransformationOutput(H, None), T[:, :1], None, None, ObjectiveParams())


# ------------------------------------------------------------------------------------------
# Config dataclasses
# ------------------------------------------------------------------------------------------


def test_reference_sections_load() -> None:
    arch = from_dict(TransformationArchParams, {"arch": "MLP_BN_SIDE_PROJECTION", "old_embedding_dim": 128,
                                                "new_embedding_dim": 128, "side_info_dim": 128, "inner_dim": 2048})
    assert arch.sigma_dim == 1 and not arch.has_uncertainty
    assert build_transformation(**arch.to_dict()).arch_params() == arch.to_dict()
    obj = from_dict(ObjectiveParams, {
        "similarity_loss": {"name": "mse", "mu_similarity": 1},
        "discriminative_loss": {"name": "LabelSmoothing", "label_smoothing": 0.1, "mu_disc": 1},
        "uncertainty_loss": {"mu_uncertainty": 0.5}})
    assert obj.discriminative_loss.smoothing == 0.1 and obj.uncertainty_loss.mu_uncertainty == 0.5
    assert from_dict(ObjectiveParams, {}) == ObjectiveParams()  # reference FCT configs have none
    assert ObjectiveParams().similarity_loss.name == "mse" and ObjectiveParams().discriminative_loss is None
    assert objective(discriminative_loss={}).discriminative_loss.smoothing == 0.1
    assert objective(discriminative_loss={"name": "CE"}).discriminative_loss.smoothing == 0.0


@pytest.mark.parametrize("cls,data,fragment", [
    (TransformationArchParams, {"arch": "MLP", "old_embedding_dim": 4, "new_embedding_dim": 4},
     "unknown transformation architecture 'MLP'"),
    (TransformationArchParams, {"arch": "LINEAR", "old_embedding_dim": 0, "new_embedding_dim": 4},
     "arch_params.old_embedding_dim must be a positive integer"),
    (TransformationArchParams, {"arch": "LINEAR", "old_embedding_dim": 4, "new_embedding_dim": 4, "sigma": 1},
     "unknown key 'sigma'"),
    (TransformationArchParams, {"arch": "MLP_BN_SIDE_PROJECTION_SIGMA", "old_embedding_dim": 4,
                                "new_embedding_dim": 4, "sigma_dim": 2}, "sigma_dim must be 1"),
    (ObjectiveParams, {"similarity_loss": {"name": "cos"}}, "similarity_loss.name must be one of"),
    (ObjectiveParams, {"similarity_loss": {"mu_similarity": -1}}, "mu_similarity must be >= 0"),
    (ObjectiveParams, {"similarity_loss": {"mu_similarity": 0}}, "every loss weight is 0"),
])
def test_config_errors(cls, data, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        from_dict(cls, data, source="t.yaml")
    assert str(info.value).startswith("t.yaml")


@pytest.mark.parametrize("cls,kwargs,fragment", [
    (DiscriminativeLossParams, {"name": "CE", "label_smoothing": 0.1}, "use name LabelSmoothing"),
    (DiscriminativeLossParams, {"label_smoothing": 1.0}, "label_smoothing must be in"),
    (DiscriminativeLossParams, {"mu_disc": -0.5}, "mu_disc must be >= 0"),
    (UncertaintyLossParams, {"mu_uncertainty": 0.0}, "mu_uncertainty must be > 0"),
])
def test_optional_section_errors(cls, kwargs, fragment) -> None:
    # These sections are Optional in ObjectiveParams; their own checks are tested directly.
    with pytest.raises(ConfigError, match=fragment):
        cls(**kwargs)
    with pytest.raises(ConfigError):
        from_dict(ObjectiveParams, {"discriminative_loss" if cls is DiscriminativeLossParams
                                    else "uncertainty_loss": kwargs}, source="t.yaml")


def test_unknown_key_in_optional_section_fails() -> None:
    with pytest.raises(ConfigError, match="discriminative_loss"):
        from_dict(ObjectiveParams, {"discriminative_loss": {"mu_dics": 1.0}}, source="t.yaml")


def test_objective_must_fit_arch() -> None:
    fct = TransformationArchParams("MLP_BN_SIDE_PROJECTION", 4, 4)
    fastfill = TransformationArchParams("MLP_BN_SIDE_PROJECTION_SIGMA", 4, 4, sigma_dim=4)
    check_objective_fits_arch(ObjectiveParams(), fct)
    check_objective_fits_arch(objective(uncertainty_loss={}), fastfill)
    with pytest.raises(ConfigError, match="arch_params.arch=MLP_BN_SIDE_PROJECTION does not"):
        check_objective_fits_arch(objective(uncertainty_loss={}), fct)
    with pytest.raises(ConfigError, match="only objective_params.uncertainty_loss trains"):
        check_objective_fits_arch(ObjectiveParams(), fastfill)


# ------------------------------------------------------------------------------------------
# Model files: transformation, transformed_old
# ------------------------------------------------------------------------------------------


def _backbone_file(path, dim: int, seed: int):
    torch.manual_seed(seed)
    arch = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": dim, "last_nonlin": True}
    model = build_backbone(**arch).eval()
    save_model_file(path, model, kind="backbone", arch_params=arch)
    return model


class _SideNet(nn.Module):  # like the reference SimCLR TorchScript files: forward -> (N, D, 1, 1)
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(dim)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


def _torchscript_file(path, dim: int):
    net = _SideNet(dim).eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    torch.jit.save(torch.jit.script(net), str(path))
    return net


def _trained_head(arch: str, sigma_dim: int = 1, **dims) -> nn.Module:
    """A head whose BatchNorm running statistics differ from their init (eval != train mode)."""
    h = build_transformation(arch, sigma_dim=sigma_dim, **dims).train()
    with torch.no_grad():
        for _ in range(3):
            h(torch.randn(32, dims["old_embedding_dim"]) * 2 + 1,
              None if dims.get("side_info_dim") is None else torch.randn(32, dims["side_info_dim"]))
    return h.eval()


def test_transformation_file_round_trip(tmp_path) -> None:
    dims = dict(SMALL)
    h = _trained_head("MLP_BN_SIDE_PROJECTION_SIGMA", sigma_dim=5, **dims)
    arch = TransformationArchParams("MLP_BN_SIDE_PROJECTION_SIGMA", sigma_dim=5, **dims)
    save_transformation(tmp_path / "h.pt", h, arch, meta={"epochs": 3})
    data = read_model_file(tmp_path / "h.pt")  # weights_only=True
    assert data["kind"] == "transformation" and data["arch_params"] == arch.to_dict()
    loaded = load_model_file(tmp_path / "h.pt")
    assert not loaded.training
    old, side = torch.randn(4, 6), torch.randn(4, 4)
    with torch.no_grad():
        a, b = h(old, side), loaded(old, side)
    torch.testing.assert_close(a.feature, b.feature)
    torch.testing.assert_close(a.log_variance, b.log_variance)
    with pytest.raises(UserError, match="differ from the ones given"):
        save_transformation(tmp_path / "bad.pt", h, dict(arch.to_dict(), inner_dim=8))
    with pytest.raises(ConfigError, match="unknown transformation arch_params key.*width"):
        save_transformation(tmp_path / "bad.pt", h, dict(arch.to_dict(), width=8))
    with pytest.raises(UserError, match="holds a transformation alone"):
        save_transformed_old_model(tmp_path / "t.pt", tmp_path / "h.pt", None, h, arch)


def test_transformed_old_round_trip_equals_composition(tmp_path) -> None:
    old = _backbone_file(tmp_path / "old.pt", 6, 1)
    side = _backbone_file(tmp_path / "side.pt", 4, 2)
    h = _trained_head("MLP_BN_SIDE_PROJECTION_SIGMA", **SMALL)
    save_transformed_old_model(tmp_path / "t.pt", tmp_path / "old.pt", tmp_path / "side.pt", h,
                               TransformationArchParams("MLP_BN_SIDE_PROJECTION_SIGMA", **SMALL))
    data = read_model_file(tmp_path / "t.pt")
    assert data["kind"] == "transformed_old"
    assert data["arch_params"]["old_model"] == {"kind": "backbone", "arch_params": {
        "arch": "CifarResNet20", "num_classes": 10, "embedding_dim": 6, "last_nonlin": True}}
    assert data["meta"]["side_info_model_path"] == str(tmp_path / "side.pt")
    model = load_model_file(tmp_path / "t.pt")
    assert isinstance(model, TransformedOldModel) and not model.training and not model.transformation.training
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        by_hand = h(old(x).embedding, side(x).embedding)
        out = model(x)
        feature, log_var = model.embed_with_uncertainty(x)
        single = model(x[:1]).embedding  # eval-mode BatchNorm: no dependence on the batch
    assert isinstance(out, BackboneOutput) and out.logits is None
    torch.testing.assert_close(out.embedding, by_hand.feature)
    torch.testing.assert_close(feature, by_hand.feature)
    torch.testing.assert_close(log_var, by_hand.log_variance)
    torch.testing.assert_close(single, out.embedding[:1])


def test_transformed_old_without_side_model(tmp_path) -> None:
    old = _backbone_file(tmp_path / "old.pt", 6, 1)
    dims = dict(SMALL, side_info_dim=None)
    h = _trained_head("MLP_BN_SIDE_PROJECTION", **dims)
    save_transformed_old_model(tmp_path / "t.pt", tmp_path / "old.pt", None, h, dims | {"arch": h.arch})
    model = load_model_file(tmp_path / "t.pt")
    assert model.side_model is None
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        emb = old(x).embedding
        torch.testing.assert_close(model(x).embedding, h(emb, emb).feature)
        feature, log_var = model.embed_with_uncertainty(x)
    assert log_var is None
    with pytest.raises(UserError, match="gives 6-d embeddings but the transformation's side_info_dim is 4"):
        save_transformed_old_model(tmp_path / "bad.pt", tmp_path / "old.pt", tmp_path / "old.pt",
                                   _trained_head("LINEAR", **SMALL), dict(SMALL, arch="LINEAR"))


def test_transformed_old_with_torchscript_parts(tmp_path) -> None:
    old = _backbone_file(tmp_path / "old.pt", 6, 1)
    side = _torchscript_file(tmp_path / "side_script.pt", 4)
    h = _trained_head("MLP_BN_SIDE_PROJECTION", **SMALL)
    save_transformed_old_model(tmp_path / "t.pt", tmp_path / "old.pt", tmp_path / "side_script.pt", h,
                               dict(SMALL, arch="MLP_BN_SIDE_PROJECTION"))
    data = torch.load(tmp_path / "t.pt", map_location="cpu", weights_only=True)
    part = data["arch_params"]["side_model"]
    assert part["torchscript"].dtype == torch.uint8
    assert part["torchscript"].numpy().tobytes() == (tmp_path / "side_script.pt").read_bytes()
    # the TorchScript weights are stored once, inside the archive
    assert not any(k.startswith("side_model.") for k in data["state_dict"])
    assert any(k.startswith("old_model.") for k in data["state_dict"])
    model = load_model_file(tmp_path / "t.pt")
    assert isinstance(model.side_model, TorchScriptPart) and not model.side_model.inner.training
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        by_hand = h(old(x).embedding, side(x).flatten(1)).feature
        torch.testing.assert_close(model(x).embedding, by_hand)
    # device / dtype moves and mode switches reach the hidden TorchScript model
    model.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()).embedding, by_hand.double())
    model.train()
    assert model.side_model.inner.training
    model.eval()

    # TorchScript old model too, and a chain: the transformed model as the old model of another update
    _torchscript_file(tmp_path / "old_script.pt", 6)
    h2 = _trained_head("LINEAR", **SMALL)
    save_transformed_old_model(tmp_path / "t2.pt", tmp_path / "old_script.pt", tmp_path / "side_script.pt", h2,
                               dict(SMALL, arch="LINEAR"))
    h3 = _trained_head("LINEAR", old_embedding_dim=5, new_embedding_dim=3, side_info_dim=None)
    save_transformed_old_model(tmp_path / "chain.pt", tmp_path / "t2.pt", None, h3,
                               {"arch": "LINEAR", "old_embedding_dim": 5, "new_embedding_dim": 3})
    chain = load_model_file(tmp_path / "chain.pt")
    first = load_model_file(tmp_path / "t2.pt")
    with torch.no_grad():
        mid = first(x).embedding
        torch.testing.assert_close(chain(x).embedding, h3(mid, mid).feature)


def test_transformed_old_as_gallery_model_in_eval(tmp_path) -> None:
    from fct.config import EvalConfig, load_config
    from fct.evaluate import evaluate

    _backbone_file(tmp_path / "old.pt", 6, 1)
    _backbone_file(tmp_path / "new.pt", 5, 2)
    h = _trained_head("MLP_BN_SIDE_PROJECTION", **dict(SMALL, side_info_dim=None))
    save_transformed_old_model(tmp_path / "t.pt", tmp_path / "old.pt", None, h,
                               dict(SMALL, arch="MLP_BN_SIDE_PROJECTION", side_info_dim=None))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        query_model_path: {tmp_path / 'new.pt'}
        gallery_model_path: {tmp_path / 't.pt'}
        eval_params: {{verbose: false}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 128}}
        runtime: {{progress: false, device: cpu}}
        """))
    res = evaluate(load_config(EvalConfig, cfg))
    assert 0.0 <= res["top1"] <= 100.0 and res["case"]["leave_one_out"] is True


def test_corrupt_transformed_old_file_is_a_user_error(tmp_path) -> None:
    _backbone_file(tmp_path / "old.pt", 6, 1)
    model = save_transformed_old_model(tmp_path / "t.pt", tmp_path / "old.pt", None,
                                       _trained_head("LINEAR", **dict(SMALL, side_info_dim=None)),
                                       dict(SMALL, arch="LINEAR", side_info_dim=None))
    data = read_model_file(tmp_path / "t.pt")
    bad = dict(data["arch_params"], side_model={"kind": "backbone"})
    save_model_file(tmp_path / "bad.pt", model, kind="transformed_old", arch_params=bad)
    with pytest.raises(UserError, match="bad.pt: arch_params.side_model must hold 'kind' and 'arch_params'"):
        load_model_file(tmp_path / "bad.pt")


def test_kinds_register_when_the_transformations_package_is_imported_first() -> None:
    # (this test process imports fct.models first; the kinds must not depend on the import order)
    code = "import fct.transformations\nfrom fct.models import MODEL_KINDS\nprint(MODEL_KINDS.names())"
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'transformation', 'transformed_old'" in out.stdout
