"""Backfilling curves: a hand-worked case, the end points, equality with a point-by-point
evaluation, orderings, AUC rules, and eval.py with feature files."""

import json
import textwrap

import numpy as np
import pytest
import torch

from fct.errors import UserError
from fct.retrieval import retrieval_metrics
from fct.retrieval.backfilling import (
    BACKFILL_ORDERS,
    BackfillCurve,
    BackfillInputs,
    backfilling_curves,
    curve_points,
)
from helpers import run_cli, run_script


# 1-D hand-worked gallery: labels 0, 0, 1, 1; new features 0, 1, 10, 11. Under h(old) item 1
# sits at 10.5, among class 1; the other items are unchanged. Queries = the new features,
# leave-one-out.
LABELS = torch.tensor([0, 0, 1, 1])
NEW = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
OLD = torch.tensor([[0.0], [10.5], [10.0], [11.0]])


def inputs(uncertainty=None, seeds=3, metric="l2"):
    return BackfillInputs(new=NEW, old=OLD, uncertainty=uncertainty, metric=metric, seed=0, random_seeds=seeds)


def curves_for(orders, steps=1, **kw):
    return backfilling_curves(NEW, LABELS, NEW, OLD, LABELS, orders, steps=steps, exclude_self=True, **kw)


def test_hand_worked_curve_and_aucs():
    # Point 0 (all h(old)), by hand:
    #   q0=0: nearest others 10 (neg), 10.5 (pos) -> first positive at rank 2; AP 1/2
    #   q1=1: nearest 0 (pos) -> hit; AP 1
    #   q2=10: 10.5 (neg, d .5), 11 (pos, d 1) -> rank 2; AP 1/2;  q3=11: same -> AP 1/2
    #   top1 25, top5 100, mAP 62.5. Backfilling item 1 alone restores new/new: 100, 100, 100.
    first_1 = torch.tensor([1, 3, 2, 0])  # item 1 in the first half
    last_1 = torch.tensor([0, 3, 2, 1])  # item 1 backfilled last
    c = curves_for({"good": [first_1], "bad": [last_1]})
    assert curve_points(4, 1) == [0, 2, 4]
    assert c["good"].fractions == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(c["good"].values["top1"][0], [25, 100, 100])
    np.testing.assert_allclose(c["good"].values["mAP"][0], [62.5, 100, 100])
    np.testing.assert_allclose(c["bad"].values["top1"][0], [25, 25, 100])
    np.testing.assert_allclose(c["bad"].values["top5"][0], [100, 100, 100])
    # AUC: mean of points; trapezoid over fractions 0, .5, 1
    assert c["good"].auc("top1")[0] == pytest.approx(75.0)
    assert c["good"].auc("top1", "trapezoid")[0] == pytest.approx((25 + 100) / 4 + (100 + 100) / 4)
    assert c["bad"].auc("top1")[0] == pytest.approx(50.0)
    assert c["bad"].auc("top1", "trapezoid")[0] == pytest.approx((25 + 25) / 4 + (25 + 100) / 4)


def test_orderings():
    # sigma: most uncertain first, ties in index order
    assert BACKFILL_ORDERS.get("sigma")(inputs(torch.tensor([0.0, 5.0, 1.0, 5.0])))[0].tolist() == [1, 3, 2, 0]
    # distance oracle: ||new - old|| = 0, 9.5, 0, 0 -> item 1, then the ties by index
    assert BACKFILL_ORDERS.get("distance")(inputs())[0].tolist() == [1, 0, 2, 3]
    # random: one permutation per seed, reproducible, not all equal
    r1 = BACKFILL_ORDERS.get("random")(inputs(seeds=4))
    r2 = BACKFILL_ORDERS.get("random")(inputs(seeds=4))
    assert len(r1) == 4 and all(torch.equal(a, b) for a, b in zip(r1, r2))
    assert all(sorted(p.tolist()) == [0, 1, 2, 3] for p in r1)
    with pytest.raises(UserError, match="sigma.*uncertainty"):
        BACKFILL_ORDERS.get("sigma")(inputs(None))
    with pytest.raises(Exception, match="valid: distance, random, sigma"):
        BACKFILL_ORDERS.get("oracle")


def test_random_runs_are_kept_and_summarised():
    perms = BACKFILL_ORDERS.get("random")(inputs(seeds=5))
    c = curves_for({"random": perms}, steps=3)
    assert c["random"].values["top1"].shape == (5, 5)
    d = c["random"].to_dict()
    assert d["runs"] == 5 and len(d["top1"]["auc_mean_runs"]) == 5
    assert d["top1"]["auc_mean"] == pytest.approx(np.mean(d["top1"]["auc_mean_runs"]))
    assert d["top1"]["points"][0] == 25.0 and d["top1"]["points"][-1] == 100.0  # ends do not depend on order
    assert d["top1"]["points_std"][0] == 0.0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_equals_point_by_point_evaluation(metric, chunk):
    g = torch.Generator().manual_seed(0)
    n, d = 60, 6
    labels = torch.randint(0, 5, (n,), generator=g)
    new = torch.randn(n, d, generator=g)
    old = new + 0.8 * torch.randn(n, d, generator=g)
    perm = torch.randperm(n, generator=g)
    steps = 4
    c = backfilling_curves(new, labels, new, old, labels, {"p": [perm]}, steps=steps, metric=metric,
                           exclude_self=True, chunk_size=chunk)["p"]
    for i, upto in enumerate(curve_points(n, steps)):
        mixed = old.clone()
        mixed[perm[:upto]] = new[perm[:upto]]
        ref = retrieval_metrics(new, labels, mixed, labels, metric=metric, exclude_self=True)
        for m in ("top1", "top5", "mAP"):
            assert c.values[m][0, i] == pytest.approx(ref[m], abs=1e-9), (m, i)
    # the end points are new/h(old) and new/new
    assert c.values["top1"][0, 0] == pytest.approx(
        retrieval_metrics(new, labels, old, labels, metric=metric, exclude_self=True)["top1"])
    assert c.values["mAP"][0, -1] == pytest.approx(
        retrieval_metrics(new, labels, new, labels, metric=metric, exclude_self=True)["mAP"])


def test_zero_steps_and_bad_permutation():
    c = curves_for({"p": [torch.arange(4)]}, steps=0)
    assert c["p"].fractions == [0.0, 1.0]
    with pytest.raises(UserError, match="not a permutation"):
        curves_for({"p": [torch.tensor([0, 0, 1, 2])]})


def test_auc_of_a_flat_curve():
    c = BackfillCurve("x", [0.0, 0.25, 1.0], {"top1": np.array([[40.0, 40.0, 40.0]])})
    assert c.auc("top1")[0] == 40.0 and c.auc("top1", "trapezoid")[0] == pytest.approx(40.0)


# --- eval.py with feature files --------------------------------------------------------------



def write_features(tmp_path, with_uncertainty):
    g = np.random.default_rng(0)
    n = 80
    labels = g.integers(0, 4, n)
    centers = g.normal(size=(4, 8)) * 1.5
    new = centers[labels] + g.normal(size=(n, 8))
    old = new + g.normal(size=(n, 8)) * np.linspace(0.1, 6, n)[:, None]  # later items worse
    np.savez(tmp_path / "new.npz", features=new.astype(np.float32), labels=labels)
    extra = {"log_variance": np.log(np.linspace(0.1, 6, n) ** 2)[:, None]} if with_uncertainty else {}
    np.savez(tmp_path / "h_old.npz", features=old.astype(np.float32), labels=labels, **extra)


def eval_yaml(tmp_path, orderings, extra=""):
    p = tmp_path / "e.yaml"
    p.write_text(textwrap.dedent(f"""\
        query_features_path: {tmp_path}/new.npz
        gallery_features_path: {tmp_path}/h_old.npz
        eval_params: {{backfilling: 3, backfilling_list: {orderings}, backfilling_random_seeds: 3,
                      backfilling_result_path: {tmp_path}/bf.npy, leave_one_out: true}}
        results_path: {tmp_path}/res.json
        """) + extra)
    return p


@pytest.mark.slow
def test_eval_script_writes_json_npy_and_plot(tmp_path):
    write_features(tmp_path, with_uncertainty=True)
    r = run_script("eval.py", "--config", str(eval_yaml(tmp_path, "[random, sigma, distance]")))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    bf = res["backfilling"]["orderings"]
    assert set(bf) == {"random", "sigma", "distance"} and bf["random"]["runs"] == 3
    for o in bf.values():
        assert len(o["top1"]["points"]) == 5 and len(o["fractions"]) == 5
        assert o["top1"]["points"][0] == pytest.approx(res["top1"])  # point 0 is new/h(old)
    # the uncertainty was built to rank the worst items first: sigma beats random here
    assert bf["sigma"]["mAP"]["auc_mean"] > bf["random"]["mAP"]["auc_mean"] + 1
    ref = np.load(tmp_path / "bf.npy", allow_pickle=True).item()  # the reference's layout
    assert set(ref["sigma"]) == {"CMC-top1", "CMC-top5", "mAP"}
    assert ref["sigma"]["CMC-top1"][0] == pytest.approx(res["top1"] / 100)
    assert (tmp_path / "bf.png").stat().st_size > 1000
    assert "AUC top1" in r.stdout


@pytest.mark.slow
def test_sigma_without_uncertainty_is_a_user_error(tmp_path):
    write_features(tmp_path, with_uncertainty=False)
    r = run_cli("eval.py", "--config", str(eval_yaml(tmp_path, "[random, sigma]")))
    assert r.returncode == 2 and "sigma" in r.stderr and "h_old.npz" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_ordering_is_a_user_error(tmp_path):
    write_features(tmp_path, with_uncertainty=False)
    r = run_cli("eval.py", "--config", str(eval_yaml(tmp_path, "[randm]")))
    assert r.returncode == 2 and "did you mean random" in r.stderr


# --- hostile-user review (issue 13) ------------------------------------------------------------


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("extra, fragment", [
    # the reference's .npy written over the gallery's features
    ("eval_params: {{backfilling: 3, backfilling_result_path: {d}/h_old.npz, leave_one_out: true}}\n",
     "eval_params.backfilling_result_path is the input gallery_features_path"),
    # the plot onto an existing folder
    ("eval_params: {{backfilling: 3, backfilling_plot_path: {d}/plots, leave_one_out: true}}\n",
     "eval_params.backfilling_plot_path: {d}/plots is a directory"),
    # the reference's .npy and the results JSON on one file: one would silently replace the other
    ("eval_params: {{backfilling: 3, backfilling_result_path: {d}/res.json, leave_one_out: true}}\n",
     "are the same file"),
])
@pytest.mark.slow
def test_backfilling_outputs_are_checked_before_any_work(tmp_path, extra, fragment):
    write_features(tmp_path, with_uncertainty=False)
    (tmp_path / "plots").mkdir()
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"query_features_path: {tmp_path}/new.npz\ngallery_features_path: {tmp_path}/h_old.npz\n"
                   f"results_path: {tmp_path}/res.json\nruntime: {{progress: false}}\n"
                   + extra.format(d=tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.npz")}
    r = run_cli("eval.py", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert fragment.format(d=tmp_path) in _one_error_line(r.stderr)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.npz")} == before
    assert not (tmp_path / "res.json").exists() and list((tmp_path / "plots").iterdir()) == []


@pytest.mark.slow
def test_backfilling_map_is_null_without_positives(tmp_path):
    # unique labels: no query has a positive, so every mAP point and AUC is undefined (null)
    g = np.random.default_rng(0)
    new = g.normal(size=(12, 4)).astype(np.float32)
    np.savez(tmp_path / "new.npz", features=new, labels=np.arange(12))
    np.savez(tmp_path / "h_old.npz", features=new + 0.5, labels=np.arange(12))
    cfg = eval_yaml(tmp_path, "[random, distance]", "runtime: {progress: false}\n")
    r = run_script("eval.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr

    def reject(name):
        raise ValueError(name)

    res = json.loads((tmp_path / "res.json").read_text(), parse_constant=reject)
    assert res["mAP"] is None and res["queries_with_positives"] == 0
    for o in res["backfilling"]["orderings"].values():
        assert o["queries_with_positives"] == 0
        assert o["mAP"]["points"] == [None] * 5 and o["mAP"]["auc_mean"] is None and "note" in o["mAP"]
        assert o["top1"]["points"] == [0.0] * 5
    rnd = res["backfilling"]["orderings"]["random"]["mAP"]
    assert rnd["auc_mean_std"] is None and rnd["points_std"] == [None] * 5
    assert "n/a" in r.stdout and "nan" not in r.stdout.lower()
