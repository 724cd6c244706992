"""Negative flips and backward-compatible weight interpolation (BCWI): hand-checked values,
exact endpoints, Fisher by hand, BatchNorm statistics, a resumed sweep and interpolate.py."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from fct.config import EvalConfig, from_dict
from fct.config.interpolation import InterpolationConfig
from fct.errors import ConfigError
from fct.models import BackboneOutput, build_backbone, save_model_file
from fct.regression import (
    average_state_dicts,
    classification_flips,
    diagonal_fisher,
    flip_rates,
    flip_report,
    interpolate_state_dicts,
    normalize_fisher,
    recompute_bn_stats,
    retrieval_flips,
)
from fct.retrieval.embeddings import embeddings_for
from fct.retrieval.engine import rank_queries
from fct.runtime import make_runtime

ARCH = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": 16, "last_nonlin": True}
from helpers import run_cli, run_script


# ------------------------------------------------------------------------------------- flips


def test_flip_rates_by_hand():
    # sample:      0  1  2  3  4
    old = [True, True, False, False, True]
    new = [True, False, True, False, True]
    f = flip_rates(old, new)
    assert f["nfr"] == pytest.approx(20.0) and f["pfr"] == pytest.approx(20.0)
    # ER_old = ER_new = 0.4: relative NFR = 0.2 / (0.6 * 0.4)
    assert f["relative_nfr"] == pytest.approx(0.2 / 0.24)
    assert f["old_error"] == pytest.approx(40.0) and f["new_error"] == pytest.approx(40.0)
    assert f["negative_flips"].tolist() == [1] and f["positive_flips"].tolist() == [2]
    assert (f["num_samples"], f["num_negative_flips"], f["num_positive_flips"]) == (5, 1, 1)


def test_classification_flips_and_undefined_relative_nfr():
    labels = torch.tensor([0, 1, 2, 3])
    old = torch.tensor([0, 1, 0, 0])  # right on 0, 1
    new = torch.tensor([0, 2, 2, 3])  # right on 0, 2, 3
    f = classification_flips(old, new, labels)
    assert f["negative_flips"].tolist() == [1] and f["positive_flips"].tolist() == [2, 3]
    assert f["nfr"] == pytest.approx(25.0) and f["pfr"] == pytest.approx(50.0)
    assert f["relative_nfr"] == pytest.approx(0.25 / (0.5 * 0.25))
    perfect = classification_flips(old, labels, labels)  # ER_new = 0: relative NFR undefined
    assert perfect["nfr"] == 0.0 and perfect["relative_nfr"] is None


def test_retrieval_flips_from_first_positive_rank():
    # right iff the nearest positive is at rank 1; rank 0 = no positive in the gallery (wrong)
    old = torch.tensor([1, 2, 1, 0, 1])
    new = torch.tensor([1, 1, 3, 1, 0])
    f = retrieval_flips(old, new)
    assert f["negative_flips"].tolist() == [2, 4] and f["positive_flips"].tolist() == [1, 3]
    assert f["nfr"] == pytest.approx(40.0) and f["pfr"] == pytest.approx(40.0)
    assert f["relative_nfr"] == pytest.approx(0.4 / (0.6 * 0.4))
    with pytest.raises(ValueError):
        retrieval_flips(old, new[:3])


def test_flip_report_on_feature_files(tmp_path):
    # 1-d features, labels (0, 0, 1, 1), leave-one-out. Reference (old): 0 -> 1, 1 -> 0, 2 -> 3
    # (4.0 < 4.9), 3 -> 2: all right. New: 0 -> 3 (2.0, label 1), 1 -> 2, 2 -> 1: wrong; 3 -> 2
    # (0.9 < 1.0): right. So queries 0, 1, 2 flip negatively: NFR 75%, PFR 0.
    labels = np.array([0, 0, 1, 1])
    old = np.array([[0.0], [0.1], [5.0], [9.0]], dtype=np.float32)
    new = np.array([[0.0], [3.0], [2.9], [2.0]], dtype=np.float32)
    for name, f in (("old", old), ("new", new)):
        np.savez(tmp_path / f"{name}.npz", features=f, labels=labels)
    cfg = from_dict(EvalConfig, {
        "query_features_path": str(tmp_path / "new.npz"), "gallery_features_path": str(tmp_path / "new.npz"),
        "reference_query_features_path": str(tmp_path / "old.npz"),
        "reference_gallery_features_path": str(tmp_path / "old.npz"),
        "results_path": str(tmp_path / "res.json"), "runtime": {"device": "cpu", "progress": False}})
    rt, cache = make_runtime(cfg.runtime), {}
    q, g = embeddings_for(cfg, "query", rt, cache), embeddings_for(cfg, "gallery", rt, cache)
    rep = flip_report(cfg, rt, cache, q, rank_queries(q.features, q.labels, g.features, g.labels, exclude_self=True))
    assert rep["retrieval"]["nfr"] == pytest.approx(75.0) and rep["retrieval"]["pfr"] == 0.0
    assert rep["classification"] is None  # feature files have no classifier
    assert rep["reference"]["leave_one_out"] is True
    # through eval.py's evaluate(): the same flips land in the results JSON, indices in the .npz
    from fct.evaluate import evaluate

    res = evaluate(cfg)
    assert res["flips"]["retrieval"]["nfr"] == pytest.approx(75.0)
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["flips"]["retrieval"]["nfr"] == pytest.approx(75.0)
    assert sorted(tmp_path.glob("res_flips*.npz")), list(tmp_path.iterdir())
    z = np.load(tmp_path / "res_flips.npz")
    assert z["retrieval_negative_flips"].tolist() == [0, 1, 2]


def test_eval_config_reference_checks():
    base = {"query_features_path": "a.npz", "gallery_features_path": "a.npz"}
    with pytest.raises(ConfigError, match="reference_gallery"):
        from_dict(EvalConfig, {**base, "reference_query_features_path": "b.npz"})
    with pytest.raises(ConfigError, match="flips_path needs a reference"):
        from_dict(EvalConfig, {**base, "flips_path": "f.npz"})


# ------------------------------------------------------------------------------ interpolation


def _states(seed_old=0, seed_new=1):
    torch.manual_seed(seed_old)
    old = build_backbone(**ARCH).state_dict()
    torch.manual_seed(seed_new)
    new = build_backbone(**ARCH).state_dict()
    new = {k: v + 0.5 if v.is_floating_point() else v + 7 for k, v in new.items()}
    return old, new


def test_interpolation_endpoints_exact_and_midpoint():
    old, new = _states()
    a0 = interpolate_state_dicts(old, new, 0.0)
    a1 = interpolate_state_dicts(old, new, 1.0)
    for k in old:
        assert torch.equal(a0[k], new[k]), k
        if old[k].is_floating_point():
            assert torch.equal(a1[k], old[k]), k
        else:
            assert torch.equal(a1[k], new[k]), k  # num_batches_tracked: from the new model
    fisher = {k: torch.rand_like(v) for k, v in old.items() if v.is_floating_point()}
    for alpha, ref in ((0.0, new), (1.0, old)):
        f = interpolate_state_dicts(old, new, alpha, fisher=fisher)
        assert all(torch.equal(f[k], ref[k]) for k in old if old[k].is_floating_point())
    mid = interpolate_state_dicts(old, new, 0.25)
    w = "conv1.weight"
    torch.testing.assert_close(mid[w], 0.25 * old[w] + 0.75 * new[w])


def test_new_class_rows_copied_from_new_model():
    old, new = _states()
    out = interpolate_state_dicts(old, new, 0.7, new_class_rows=(5, 10))
    w = "classifier.weight"
    assert torch.equal(out[w][5:], new[w][5:])
    torch.testing.assert_close(out[w][:5], 0.7 * old[w][:5] + 0.3 * new[w][:5])
    at_one = interpolate_state_dicts(old, new, 1.0, new_class_rows=(5, 10))
    assert torch.equal(at_one[w][:5], old[w][:5]) and torch.equal(at_one[w][5:], new[w][5:])
    assert torch.equal(at_one["conv1.weight"], old["conv1.weight"])


def test_soup_is_the_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(9)}
    s = average_state_dicts([a, b, c])
    torch.testing.assert_close(s["w"], torch.tensor([3.0, 3.0]))
    assert s["n"].item() == 3  # integer buffers from the first model


class TwoWeights(nn.Module):
    """logits = (w1 * x0, w2 * x1): a two-parameter classifier."""

    def __init__(self, w1: float, w2: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1))
        self.w2 = nn.Parameter(torch.tensor(w2))

    def forward(self, x):
        logits = torch.stack([self.w1 * x[:, 0], self.w2 * x[:, 1]], dim=1)
        return BackboneOutput(embedding=x, logits=logits)


def test_fisher_by_hand_and_weighted_interpolation():
    # w = 0: p = (0.5, 0.5). d log p_y / d w1 = x0 (1[y=0] - p0), d/d w2 = x1 (1[y=1] - p1).
    # sample 1: x = (2, 0), y = 0 -> g = (1, 0); sample 2: x = (1, 2), y = 1 -> g = (-0.5, 1)
    # F = mean of squares = ((1 + 0.25) / 2, (0 + 1) / 2) = (0.625, 0.5); per-sample, not per-batch.
    model = TwoWeights(0.0, 0.0)
    batches = [(torch.tensor([[2.0, 0.0], [1.0, 2.0]]), torch.tensor([0, 1]))]
    f = diagonal_fisher(model, batches, torch.device("cpu"), labels="true")
    assert f["w1"].item() == pytest.approx(0.625) and f["w2"].item() == pytest.approx(0.5)

    old = {"w1": torch.tensor(1.0), "w2": torch.tensor(2.0)}
    new = {"w1": torch.tensor(3.0), "w2": torch.tensor(6.0)}
    out = interpolate_state_dicts(old, new, 0.5, fisher=f)
    # (alpha F old + (1 - alpha) new) / (alpha F + 1 - alpha)
    assert out["w1"].item() == pytest.approx((0.5 * 0.625 * 1 + 0.5 * 3) / (0.5 * 0.625 + 0.5))
    assert out["w2"].item() == pytest.approx((0.5 * 0.5 * 2 + 0.5 * 6) / (0.5 * 0.5 + 0.5))
    n = normalize_fisher(f, "mean")  # mean F = 0.5625
    assert n["w1"].item() == pytest.approx(0.625 / 0.5625) and n["w2"].item() == pytest.approx(0.5 / 0.5625)
    # F = 0 at alpha 1 (0 / 0): the old weight
    zero = interpolate_state_dicts(old, new, 1.0, fisher={"w1": torch.tensor(0.0), "w2": torch.tensor(0.0)})
    assert zero["w1"].item() == 1.0


def test_bn_recompute_gives_the_data_statistics():
    model = nn.Sequential(nn.BatchNorm1d(2))
    model[0].running_mean.fill_(100.0)
    batches = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 10.0]])]
    assert recompute_bn_stats(model, batches, torch.device("cpu")) == 1
    bn = model[0]
    # momentum None: equal-weight average of batch means (2, 3), (6, 8) and unbiased variances (2, 2), (2, 8)
    torch.testing.assert_close(bn.running_mean, torch.tensor([4.0, 5.5]))
    torch.testing.assert_close(bn.running_var, torch.tensor([2.0, 5.0]))
    assert bn.momentum == 0.1 and not model.training


# ------------------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """An old model (trained on classes 0-4) and two new ones (0-9) 'fine-tuned' from it
    (perturbed copies): interpolation does not need trained models."""
    d = tmp_path_factory.mktemp("bcwi_models")
    torch.manual_seed(0)
    old = build_backbone(**ARCH).eval()
    save_model_file(d / "old.pt", old, kind="backbone", arch_params=ARCH, meta={"trained_classes": 5})
    for i in (1, 2):
        torch.manual_seed(i)
        new = build_backbone(**ARCH).eval()
        new.load_state_dict(old.state_dict())
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_model_file(d / f"new{i}.pt", new, kind="backbone", arch_params=ARCH,
                        meta={"trained_classes": 10})
    return d


def sweep_cfg(models, out, **extra):
    return {
        "old_model_path": str(models / "old.pt"),
        "new_model_paths": [str(models / "new1.pt"), str(models / "new2.pt")],
        "dataset_params": {"name": "digits", "num_workers": 0, "batch_size": 128},
        "output_dir": str(out),
        "fisher": {"max_samples": 16},
        "batchnorm": {"num_batches": 2},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False},
        **extra,
    }


def test_interrupted_sweep_resumes(tiny_models, tmp_path):
    from fct.regression.sweep import run_sweep

    computed = []
    first = from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, methods=["plain"],
                                                     alphas=[0.0, 1.0], batchnorm={"recompute": False}))
    res1 = run_sweep(first, on_point=computed.append)
    assert computed == ["plain@0", "plain@1"]
    # alpha 0 without BN recomputation is the new model itself
    assert res1["points"]["plain@0"]["accuracy"] == res1["reference"]["new"]["accuracy"]
    new_map = res1["reference"]["new"]["retrieval_map"]
    assert res1["points"]["plain@0"]["retrieval_map"] == pytest.approx(new_map)
    assert res1["reference"]["old"]["nfr"] == 0.0
    stamps = {k: p["finished_at"] for k, p in res1["points"].items()}
    computed.clear()
    full = from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, methods=["plain"],
                                                    alphas=[0.0, 0.5, 1.0], batchnorm={"recompute": False}))
    res2 = run_sweep(full, on_point=computed.append)
    assert computed == ["plain@0.5"]
    assert {k: res2["points"][k]["finished_at"] for k in stamps} == stamps
    # a setting that changes the numbers refuses to mix with the old results
    other = from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, methods=["plain"], alphas=[0.0]))
    with pytest.raises(Exception, match="different settings"):
        run_sweep(other)


@pytest.mark.parametrize("augment", [True, False])
def test_bn_batches_are_the_same_for_every_point(tiny_models, tmp_path, augment):
    from fct.regression.sweep import SweepData

    cfg = from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, batchnorm={"num_batches": 3,
                                                                                     "augment": augment}))
    data = SweepData(cfg, old_classes=5, new_classes=10)
    torch.manual_seed(123)
    first, n = data.bn_batches()
    first = list(first)
    after = torch.rand(1)  # the global generator is left as it was
    torch.manual_seed(999)
    second = list(data.bn_batches()[0])
    assert n == 3 and len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)
    plain = list(SweepData(from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, batchnorm={
        "num_batches": 3, "augment": False})), 5, 10).bn_batches()[0])
    # the training transforms (random crop of the padded image, flip) change the pixels
    assert all(torch.equal(a, b) for a, b in zip(first, plain)) == (not augment)


def test_interpolation_config_errors(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="soup"):
        from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, methods=["soup"],
                                                 new_model_paths=[str(tiny_models / "new1.pt")]))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, alphas=[0.5, 1.5]))
    with pytest.raises(ConfigError, match="unknown interpolation method"):
        from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, methods=["linear"]))
    with pytest.raises(ConfigError, match="dataset_params.name=webdataset: interpolate.py"):
        from_dict(InterpolationConfig, sweep_cfg(tiny_models, tmp_path, dataset_params={
            "name": "webdataset", "data_root": str(tmp_path)}))
    p = tmp_path / "bad.yaml"
    p.write_text(json.dumps({**sweep_cfg(tiny_models, tmp_path), "alpha": [0.5]}))
    r = run_cli("interpolate.py", "--config", str(p))
    assert r.returncode == 2 and "alpha" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_interpolate_script_end_to_end(tiny_models, tmp_path):
    out = tmp_path / "sweep"
    cfg = tmp_path / "interp.yaml"
    cfg.write_text(json.dumps(sweep_cfg(tiny_models, out, methods=["plain", "fisher", "soup"],
                                        alphas=[0.0, 0.5, 1.0], save_models=True)))
    r = run_script("interpolate.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    expected = [f"{m}@{a}" for m in ("plain", "fisher", "soup") for a in ("0", "0.5", "1")]
    assert sorted(res["points"]) == sorted(expected)
    for p in res["points"].values():
        for k in ("accuracy", "nfr", "pfr", "retrieval_top1", "retrieval_map", "retrieval_nfr"):
            assert isinstance(p[k], float), k
    assert set(res["reference"]) == {"old", "new", "new2"} and "best" in res
    assert (out / "accuracy_vs_nfr.png").stat().st_size > 0 and (out / "fisher.pt").exists()
    assert "| method" in (out / "results.md").read_text()
    z = np.load(out / "flips" / "fisher@0.5.npz")
    assert {"classification_negative_flips", "retrieval_negative_flips"} <= set(z.files)
    assert (out / "models" / "soup_alpha0.5.pt").exists()
    again = run_script("interpolate.py", "--config", str(cfg))  # everything finished: nothing recomputed
    assert again.returncode == 0 and "resuming: 9 point(s)" in again.stdout, again.stderr[-2000:]


# ------------------------------------------------------- hostile-user review (issue 13)


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fisher_cache_is_the_old_model", "output_dir_is_the_old_model", "config"])
def test_interpolate_refuses_outputs_that_are_inputs(tiny_models, tmp_path, case):
    import shutil

    out = tmp_path / "sweep"
    out.mkdir()
    old = out / "fisher.pt"  # the sweep's Fisher cache would replace it
    shutil.copy(tiny_models / "old.pt", old)
    cfg = tmp_path / "interp.yaml"
    body = sweep_cfg(tiny_models, out, methods=["plain", "fisher"], alphas=[0.5])
    if case == "fisher_cache_is_the_old_model":
        body["old_model_path"], fragment = str(old), "output_dir/fisher.pt is the input old_model_path"
    elif case == "output_dir_is_the_old_model":
        body["output_dir"], fragment = str(old), "output_dir: " + str(old) + " is a file"
    else:  # the run folder's config.yaml is the config given on the command line
        cfg = out / "config.yaml"
        fragment = "output_dir/config.yaml is the input --config"
    cfg.write_text(json.dumps(body))
    guarded = [old, tiny_models / "old.pt", tiny_models / "new1.pt", cfg]
    before = [p.read_bytes() for p in guarded]
    r = run_cli("interpolate.py", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert fragment in _one_error_line(r.stderr)
    assert [p.read_bytes() for p in guarded] == before
    assert {p.name for p in out.iterdir()} == {"fisher.pt"} | ({"config.yaml"} if case == "config" else set())


class _RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["fisher_garbage", "fisher_malicious", "fisher_wrong_shape", "results_nan"])
def test_damaged_cache_files_are_one_line_errors(tiny_models, tmp_path, cache):
    import pickle

    out = tmp_path / "sweep"
    out.mkdir()
    marker = tmp_path / "pwned"
    if cache == "fisher_garbage":
        path = out / "fisher.pt"
        path.write_bytes(b"\x80\x04not a pickle at all" * 10)
    elif cache == "fisher_malicious":
        path = out / "fisher.pt"
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    elif cache == "fisher_wrong_shape":
        # the right settings (so it would be used) but weights of another shape
        from fct.io import file_sha256

        path = out / "fisher.pt"
        settings = {"labels": "true", "max_samples": 16, "normalize": "mean",
                    "old_sha256": file_sha256(tiny_models / "old.pt")[:16], "seed": 0}
        torch.save({"settings": settings, "fisher": {"conv1.weight": torch.ones(3)}}, path)
    else:
        path = out / "results.json"
        path.write_text('{"settings": {}, "reference": {}, "points": {"plain@0": {"accuracy": NaN}}}')
    cfg = tmp_path / "interp.yaml"
    cfg.write_text(json.dumps(sweep_cfg(tiny_models, out, methods=["fisher"], alphas=[0.5],
                                        batchnorm={"recompute": False})))
    before = path.read_bytes()
    r = run_cli("interpolate.py", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert str(path) in line and "delete it" in line, line
    assert path.read_bytes() == before and not marker.exists()
