"""eval.py end to end: models, TorchScript models, feature files, errors, torchrun."""

import json
import textwrap

import numpy as np
import pytest
import torch

from fct.config import EvalConfig, load_config
from fct.evaluate import evaluate
from fct.models import build_backbone, save_model_file
from fct.retrieval.reference import naive_retrieval_metrics
from helpers import free_port, run_cli, run_script



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    paths = {}
    for name, dim, seed in (("a", 16, 0), ("b", 16, 1), ("c", 8, 2)):
        torch.manual_seed(seed)
        arch = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": dim, "last_nonlin": True}
        m = build_backbone(**arch).eval()
        save_model_file(d / f"{name}.pt", m, kind="backbone", arch_params=arch)
        paths[name] = d / f"{name}.pt"

    class Scripted(torch.nn.Module):  # the reference's TorchScript files: forward returns the embedding
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).embedding[:, :, None, None]

    torch.manual_seed(0)
    inner = build_backbone(arch="CifarResNet20", num_classes=10, embedding_dim=16, last_nonlin=True).eval()
    scripted = torch.jit.trace(Scripted(inner), torch.zeros(2, 3, 8, 8))
    torch.jit.save(scripted, str(d / "a_script.pt"))
    paths["a_script"] = d / "a_script.pt"
    return paths


def eval_cfg(tmp_path, body, extra=""):
    p = tmp_path / "eval.yaml"
    p.write_text(textwrap.dedent(body) + extra)
    return p


DIGITS = "dataset_params: {name: digits, num_workers: 0, batch_size: 128}\nruntime: {progress: false}\n"


def test_models_on_digits_equal_naive_reference(tmp_path, models):
    from fct.data import build_dataset
    from fct.models import load_model_file

    cfg = load_config(EvalConfig, eval_cfg(tmp_path, f"""\
        query_model_path: {models['b']}
        gallery_model_path: {models['a']}
        results_path: {tmp_path}/res.json
        eval_params: {{verbose: false}}
        """, DIGITS))
    res = evaluate(cfg)
    ds = build_dataset("digits", "", "val", augment=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        q = load_model_file(models["b"])(x).embedding.numpy()
        g = load_model_file(models["a"])(x).embedding.numpy()
    ref = naive_retrieval_metrics(q, labels, g, labels, metric="l2", exclude_self=True)
    for k in ("top1", "top5", "mAP"):
        assert res[k] == pytest.approx(ref[k], abs=1e-4)
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["case"]["leave_one_out"] is True and saved["top1"] == pytest.approx(res["top1"])


def test_torchscript_model_matches_own_model_file(tmp_path, models):
    base = "eval_params: {verbose: false}\n" + DIGITS
    own = evaluate(load_config(EvalConfig, eval_cfg(tmp_path, f"query_model_path: {models['a']}\n"
                                                               f"gallery_model_path: {models['a']}\n" + base)))
    ts = evaluate(load_config(EvalConfig, eval_cfg(tmp_path, f"query_model_path: {models['a_script']}\n"
                                                              f"gallery_model_path: {models['a_script']}\n" + base)))
    for k in ("top1", "top5", "mAP"):
        assert own[k] == pytest.approx(ts[k], abs=1e-4)


def test_feature_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    feats = (rng.normal(size=(5, 8))[labels] + rng.normal(size=(200, 8))).astype(np.float32)
    np.savez(tmp_path / "f.npz", features=feats, labels=labels)
    other = feats[:50] + 0.1
    np.savez(tmp_path / "q.npz", features=other.astype(np.float32), labels=labels[:50])
    same = evaluate(load_config(EvalConfig, eval_cfg(tmp_path, f"""\
        query_features_path: {tmp_path}/f.npz
        gallery_features_path: {tmp_path}/f.npz
        eval_params: {{verbose: false, distance_metric: cosine}}
        """)))
    ref = naive_retrieval_metrics(feats, labels, feats, labels, metric="cosine", exclude_self=True)
    assert same["case"]["leave_one_out"] and same["mAP"] == pytest.approx(ref["mAP"], abs=1e-4)
    cross = evaluate(load_config(EvalConfig, eval_cfg(tmp_path, f"""\
        query_features_path: {tmp_path}/q.npz
        gallery_features_path: {tmp_path}/f.npz
        eval_params: {{verbose: false}}
        """)))
    ref = naive_retrieval_metrics(other, labels[:50], feats, labels, metric="l2", exclude_self=False)
    assert not cross["case"]["leave_one_out"] and cross["top1"] == pytest.approx(ref["top1"], abs=1e-4)


DIGITS_FMT = DIGITS.replace("{", "{{").replace("}", "}}")


@pytest.mark.parametrize("body, fragment", [
    ("query_model_path: {d}/missing.pt\ngallery_model_path: {a}\n" + DIGITS_FMT, "missing.pt"),
    ("query_model_path: {c}\ngallery_model_path: {a}\n" + DIGITS_FMT, "8-d"),
    ("query_model_path: {d}/eval.yaml\ngallery_model_path: {a}\n" + DIGITS_FMT, "eval.yaml"),
    ("query_features_path: {d}/nope.npz\ngallery_features_path: {d}/nope.npz\n", "nope.npz"),
    ("query_features_path: {d}/bad.npz\ngallery_features_path: {d}/bad.npz\n", "labels"),
    ("query_model_path: {a}\ngallery_model_path: {a}\n" + DIGITS_FMT + "eval_params: {{distance_metric: l3}}\n", "l3"),
])
@pytest.mark.slow
def test_eval_user_errors_exit_2(tmp_path, models, body, fragment):
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2), np.float32))
    cfg = eval_cfg(tmp_path, body.format(d=tmp_path, a=models["a"], c=models["c"]))
    r = run_cli("eval.py", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and fragment in r.stderr, r.stderr



@pytest.mark.slow
def test_eval_under_torchrun_equals_single_process(tmp_path, models):
    body = f"""\
        query_model_path: {models['b']}
        gallery_model_path: {models['a']}
        results_path: {{out}}
        dataset_params: {{{{name: digits, num_workers: 0, batch_size: 50}}}}
        runtime: {{{{progress: false}}}}
        """
    one = eval_cfg(tmp_path, body.format(out=tmp_path / "one.json"))
    r = run_script("eval.py", "--config", str(one))
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two.yaml"
    two.write_text(textwrap.dedent(body.format(out=tmp_path / "two.json")))
    r = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "eval.py", "--config", str(two))
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    for k in ("top1", "top5", "mAP", "num_queries"):
        assert a[k] == pytest.approx(b[k], abs=1e-6)


# --- hostile-user review (issue 13): outputs that are inputs, undefined mAP -------------------


def _strict_json(text):
    """json.loads that refuses NaN / Infinity, as strict parsers do."""
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def _one_line(stderr, prefix):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("target, fragment", [
    ("features", "results_path is the input query_features_path"),
    ("link", "results_path is the input query_features_path"),  # the same file through a symlink
    ("gallery_model", "results_path is the input gallery_model_path"),
    ("config", "results_path is the input --config"),
    ("folder", "is a directory"),
])
@pytest.mark.slow
def test_eval_refuses_an_output_that_is_an_input(tmp_path, models, target, fragment):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", features=rng.normal(size=(20, 16)).astype(np.float32),
             labels=rng.integers(0, 3, 20))
    (tmp_path / "link.json").symlink_to(tmp_path / "f.npz")
    (tmp_path / "out").mkdir()
    results = {"features": tmp_path / "f.npz", "link": tmp_path / "link.json", "gallery_model": models["a"],
               "config": tmp_path / "eval.yaml", "folder": tmp_path / "out"}[target]
    if target == "gallery_model":
        body = f"query_model_path: {models['b']}\ngallery_model_path: {models['a']}\n" + DIGITS
    else:
        body = (f"query_features_path: {tmp_path}/f.npz\ngallery_features_path: {tmp_path}/f.npz\n"
                "runtime: {progress: false}\n")
    cfg = eval_cfg(tmp_path, body + f"results_path: {results}\n")
    guarded = [tmp_path / "f.npz", models["a"], models["b"], cfg]
    before = [p.read_bytes() for p in guarded]
    r = run_cli("eval.py", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert fragment in _one_line(r.stderr, "error:")
    assert [p.read_bytes() for p in guarded] == before
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 6])
def test_map_is_null_when_no_query_has_a_positive(tmp_path, rows):
    # every label unique (or a single row): under leave-one-out no query has a positive
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "u.npz", features=rng.normal(size=(rows, 4)).astype(np.float32),
             labels=np.arange(rows))
    cfg = eval_cfg(tmp_path, f"""\
        query_features_path: {tmp_path}/u.npz
        gallery_features_path: {tmp_path}/u.npz
        results_path: {tmp_path}/res.json
        eval_params: {{per_class: true}}
        runtime: {{progress: false}}
        """)
    r = run_script("eval.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    res = _strict_json((tmp_path / "res.json").read_text())
    assert res["mAP"] is None and res["queries_with_positives"] == 0
    assert res["top1"] == 0.0 and res["num_queries"] == rows
    assert res["per_class"]["0"] == {"top1": 0.0, "top5": 0.0, "queries": 1, "queries_with_positives": 0}
    assert "n/a" in r.stdout and "nan" not in r.stdout.lower()


@pytest.mark.parametrize("knn_backend", ["torch", "faiss"])
def test_one_ranking_pass_serves_metrics_per_class_and_flips(tmp_path, monkeypatch, knn_backend):
    # The evaluated case is ranked once; only the reference case gets a pass of its own. Its
    # per-class results and flips equal those computed from passes of their own.
    if knn_backend == "faiss":
        pytest.importorskip("faiss")
    import fct.evaluate
    import fct.regression.flips
    from fct.config import from_dict
    from fct.regression.flips import retrieval_flips
    from fct.retrieval.engine import rank_queries
    from fct.retrieval.metrics import per_class_cmc

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=120)
    new, old = (np.round(rng.normal(size=(120, 4)) * 4).astype(np.float32) for _ in range(2))
    np.savez(tmp_path / "new.npz", features=new, labels=labels)
    np.savez(tmp_path / "old.npz", features=old, labels=labels)
    cfg = from_dict(EvalConfig, {
        "query_features_path": str(tmp_path / "new.npz"), "gallery_features_path": str(tmp_path / "new.npz"),
        "reference_query_features_path": str(tmp_path / "old.npz"),
        "reference_gallery_features_path": str(tmp_path / "old.npz"), "results_path": str(tmp_path / "r.json"),
        "eval_params": {"per_class": True, "verbose": False, "knn_backend": knn_backend},
        "runtime": {"device": "cpu", "progress": False}})
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["compute_map"])
        return rank_queries(*args, **kwargs)

    monkeypatch.setattr(fct.evaluate, "rank_queries", counted)
    monkeypatch.setattr(fct.regression.flips, "rank_queries", counted)
    res = evaluate(cfg)
    assert calls == [True, False]  # the evaluated case (with AP), then the reference case
    y = torch.as_tensor(labels)
    own = rank_queries(torch.from_numpy(new), y, torch.from_numpy(new), y, exclude_self=True, compute_map=False)
    ref = rank_queries(torch.from_numpy(old), y, torch.from_numpy(old), y, exclude_self=True, compute_map=False)
    assert res["per_class"] == per_class_cmc(own, y, (1, 5))
    flips = retrieval_flips(ref.first_positive_rank, own.first_positive_rank)
    assert res["flips"]["retrieval"]["nfr"] == flips["nfr"] and res["flips"]["retrieval"]["pfr"] == flips["pfr"]
