"""compat.py: a three-version chain on digits with untrained models made here; routes through
identity and backward-map edges; the matrix equals evaluations done by hand; errors exit 2."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fct.compat.chain import evaluate_chain
from fct.config import load_config
from fct.config.chain import ChainConfig
from fct.errors import ConfigError, UserError
from fct.models import build_backbone, save_model_file, save_transformation
from fct.retrieval import retrieval_metrics
from fct.retrieval.embeddings import model_embeddings
from fct.runtime import make_runtime
from fct.transformations import build_transformation
from helpers import REPO


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    for name, dim, seed in (("v0", 8, 0), ("v1", 8, 1), ("v2", 12, 2)):
        torch.manual_seed(seed)
        arch = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": dim, "last_nonlin": True}
        save_model_file(d / f"{name}.pt", build_backbone(**arch).eval(), kind="backbone", arch_params=arch)
    torch.manual_seed(3)
    b2 = build_transformation("LINEAR", old_embedding_dim=12, new_embedding_dim=8)  # v2 -> v1
    save_transformation(d / "B2.pt", b2, {"arch": "LINEAR", "old_embedding_dim": 12, "new_embedding_dim": 8})
    return d


def chain_yaml(d, out, v2_edges="[{source: v2, target: v1, kind: transformation, path: %s/B2.pt}]",
               v2_compat="[v1, v0]", v1_compat="[v0]"):
    text = textwrap.dedent(f"""\
        versions:
          - {{id: v0, model_path: {d}/v0.pt, change: major}}
          - {{id: v1, model_path: {d}/v1.pt, parent: v0, compatible_with: {v1_compat},
              edges: [{{source: v1, target: v0, kind: identity}}]}}
          - {{id: v2, model_path: {d}/v2.pt, parent: v1, change: major, compatible_with: {v2_compat},
              edges: {v2_edges % d if '%s' in v2_edges else v2_edges}}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 256}}
        registry_dir: {out}/registry
        output_dir: {out}/matrix
        projection: false
        runtime: {{progress: false}}
        """)
    p = out / "chain.yaml"
    p.write_text(text)
    return p


def test_matrix_follows_the_edges(chain, tmp_path):
    cfg = load_config(ChainConfig, chain_yaml(chain, tmp_path))
    res = evaluate_chain(cfg)
    rt = make_runtime(cfg.runtime)
    f = {v: model_embeddings(str(chain / f"{v}.pt"), cfg.dataset_params, rt) for v in ("v0", "v1", "v2")}
    from fct.models import load_model_file

    b2 = load_model_file(chain / "B2.pt").eval()
    with torch.no_grad():
        v2_in_v1 = b2(f["v2"].features).feature
    y = f["v0"].labels

    def top1(q, g):
        return retrieval_metrics(q, y, g, y, exclude_self=True)["top1"]

    m = res["top1"]["matrix"]
    assert m[0][0] == pytest.approx(top1(f["v0"].features, f["v0"].features))
    # v1 -> v0 identity: compared as they are; v2 -> v1 -> v0: queries through B2 then identity
    assert m[1][0] == pytest.approx(top1(f["v1"].features, f["v0"].features))
    assert m[2][1] == pytest.approx(top1(v2_in_v1, f["v1"].features))
    assert m[2][0] == pytest.approx(top1(v2_in_v1, f["v0"].features))
    assert m[0][1] is None  # upper triangle
    assert "queries mapped" in res["routes"][2][0] and "B2" not in res["routes"][1][0]
    saved = json.loads((tmp_path / "matrix" / "matrix.json").read_text())
    assert saved["top1"]["AC"] == res["top1"]["AC"] and 0 <= saved["top1"]["AC"] <= 1
    assert (tmp_path / "matrix" / "matrix_top1.png").stat().st_size > 1000
    assert json.loads((tmp_path / "registry" / "registry.json").read_text())["versions"][2]["id"] == "v2"


def test_unbacked_claim_is_refused(chain, tmp_path):
    # v2 claims compatibility but has no edge: refused before anything is evaluated
    cfg = load_config(ChainConfig, chain_yaml(chain, tmp_path, v2_edges="[]"))
    with pytest.raises(UserError, match="claims compatibility"):
        evaluate_chain(cfg)


@pytest.mark.parametrize("overrides", [["eval_params.knn_backend=faiss_hnsw"],
                                       ["eval_params.knn_backend=faiss_ivf_flat", "eval_params.compute_map=false"]])
def test_approximate_search_is_refused_for_a_matrix(chain, tmp_path, overrides):
    # every cell reports mAP: the refusal names the backend, not compute_map (the user cannot turn it off here)
    with pytest.raises(ConfigError, match="knn_backend 'faiss_.*': a compatibility matrix scores every cell by exact"):
        load_config(ChainConfig, chain_yaml(chain, tmp_path), overrides)


@pytest.mark.slow
def test_config_errors(chain, tmp_path):
    bad = chain_yaml(chain, tmp_path, v1_compat="[v2]")
    with pytest.raises(ConfigError, match="not an older version"):
        load_config(ChainConfig, bad)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "compat.py", "--config", str(bad)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "compatible_with" in r.stderr and "Traceback" not in r.stderr


def test_undefined_map_is_null_in_strict_json(chain, tmp_path, monkeypatch, capsys):
    """Issue 13: when no query has a positive, mAP is undefined for every pair: the matrix entry is
    null with the reason, never NaN, and the table shows n/a."""
    import fct.retrieval

    real = fct.retrieval.retrieval_metrics

    def no_positives(*args, **kwargs):
        res = real(*args, **kwargs)
        return {**res, "mAP": None, "queries_with_positives": 0}

    monkeypatch.setattr(fct.retrieval, "retrieval_metrics", no_positives)
    cfg = load_config(ChainConfig, chain_yaml(chain, tmp_path), ["headline_metric=mAP"])
    res = evaluate_chain(cfg)

    def reject(name):
        raise ValueError(name)

    saved = json.loads((tmp_path / "matrix" / "matrix.json").read_text(), parse_constant=reject)
    assert saved["mAP"]["matrix"] is None and saved["mAP"]["AM"] is None
    assert saved["mAP"]["queries_with_positives"] == 0 and "undefined" in saved["mAP"]["note"]
    assert saved["top1"]["matrix"][0][0] == pytest.approx(res["top1"]["matrix"][0][0])
    assert not (tmp_path / "matrix" / "matrix_mAP.png").exists()
    assert "mAP: n/a" in capsys.readouterr().out
