"""Approximate k-NN (fct/retrieval/ann.py): IVF-Flat probing every cell is exact search, recall@k
on hand-made neighbour lists, HNSW and IVF-PQ on clustered data, config errors naming the key,
and an eval.py run on stored features that writes the ann block."""

import json
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from fct.cli import run_main  # noqa: E402
from fct.config import EvalConfig, from_dict  # noqa: E402
from fct.config.evaluation import APPROXIMATE_KNN_BACKENDS, AnnParams  # noqa: E402
from fct.errors import ConfigError, UserError  # noqa: E402
from fct.retrieval import KNN_BACKENDS, retrieval_metrics  # noqa: E402
from fct.retrieval.ann import ANN_INDEXES, approximate_search, recall_sample, sampled_recall  # noqa: E402
from fct.retrieval.metrics import cmc_from_neighbors, neighbor_labels  # noqa: E402
from helpers import REPO, one_error_line  # noqa: E402


def _clustered(n: int, dim: int, classes: int, seed: int, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, dim))[labels] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def test_every_approximate_backend_has_an_index_and_is_registered():
    assert sorted(ANN_INDEXES) == sorted(APPROXIMATE_KNN_BACKENDS)
    assert all(name in KNN_BACKENDS for name in APPROXIMATE_KNN_BACKENDS)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("nlist", [1, 4])
def test_ivf_flat_probing_every_cell_equals_exact_search(metric, exclude_self, nlist):
    # nprobe = nlist scans every stored vector: the lists are the exact ones (continuous data, no ties)
    x, _ = _clustered(300, 8, 4, seed=0)
    params = AnnParams(nlist=nlist, nprobe=nlist)
    av, ai = KNN_BACKENDS.get("faiss_ivf_flat")(x, x, 10, metric, exclude_self, params=params)
    tv, ti = KNN_BACKENDS.get("torch")(x, x, 10, metric, exclude_self)
    assert torch.equal(ai, ti)
    assert torch.allclose(av, tv, atol=1e-4, rtol=1e-4)
    if exclude_self:
        assert not (ai == torch.arange(300)[:, None]).any()


def test_recall_on_hand_made_lists():
    gallery = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    query = np.array([[0.1], [4.9]], np.float32)  # exact top-3: {0, 1, 2} and {5, 4, 3}
    approx = np.array([[0, 5, 1],   # first: 1 of top-1, 2 of top-3
                       [3, 4, -1]])  # second: item 3 is not its top-1; 2 of top-3, one list entry missing
    assert sampled_recall(query, gallery, approx, [1, 3]) == {1: 0.5, 3: pytest.approx(4 / 6)}
    assert sampled_recall(query, gallery, approx, [1, 3], sample=[1]) == {1: 0.0, 3: pytest.approx(2 / 3)}


def test_recall_counts_any_exact_answer_under_ties_and_never_the_query_itself():
    gallery = np.array([[-1.0], [1.0], [3.0]], np.float32)
    query = np.array([[0.0]], np.float32)  # items 0 and 1 tie for the nearest
    for approx, expected in (([[0]], 1.0), ([[1]], 1.0), ([[2]], 0.0)):
        assert sampled_recall(query, gallery, np.array(approx), [1]) == {1: expected}
    # leave-one-out on x = (0, 1, 5): query 0's exact top-1 is item 1, never itself
    x = np.array([[0.0], [1.0], [5.0]], np.float32)
    assert sampled_recall(x, x, np.array([[0], [0], [1]]), [1], exclude_self=True) == {1: pytest.approx(2 / 3)}
    # cosine ranks by angle: (1, 0.1) is nearer to (1, 0) than (0, 1) is, whatever its length
    g = np.array([[10.0, 1.0], [0.0, 1.0]], np.float32)
    assert sampled_recall(np.array([[1.0, 0.0]], np.float32), g, np.array([[0]]), [1], metric="cosine") == {1: 1.0}
    assert sampled_recall(np.array([[1.0, 0.0]], np.float32), g, np.array([[1]]), [1], metric="cosine") == {1: 0.0}


def test_recall_sample_is_seeded_and_capped():
    a = recall_sample(1000, 50, seed=3)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, recall_sample(1000, 50, seed=3))
    assert not np.array_equal(a, recall_sample(1000, 50, seed=4))
    assert np.array_equal(recall_sample(7, 50, seed=0), np.arange(7))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_ivf_flat_gives_recall_one_and_the_exact_cmc(metric):
    x, y = _clustered(400, 8, 5, seed=1, spread=1.5)
    exact = retrieval_metrics(x, y, x, y, metric=metric, exclude_self=True, topk=(1, 5), compute_map=False,
                              knn_backend="faiss")
    approx = retrieval_metrics(x, y, x, y, metric=metric, exclude_self=True, topk=(1, 5), compute_map=False,
                               knn_backend="faiss_ivf_flat", ann=AnnParams(nlist=1, nprobe=1, recall_queries=100))
    block = approx.pop("ann")
    assert approx == exact
    assert block["recall_at_k"] == {"1": 1.0, "5": 1.0} and block["queries_sampled"] == 100
    assert block["backend"] == "faiss_ivf_flat" and block["device"] == "cpu" and block["incomplete_lists"] == 0
    assert block["params"] == {"nlist": 1, "nprobe": 1, "train_size": 64}
    json.dumps(block, allow_nan=False)


def test_hnsw_reaches_high_recall_on_clustered_data():
    x, y = _clustered(2000, 16, 20, seed=2)
    idx, block = approximate_search(torch.from_numpy(x), torch.from_numpy(x), 10, (1, 10), backend="faiss_hnsw",
                                    metric="l2", exclude_self=True, params=AnnParams(recall_queries=300))
    assert idx.shape == (2000, 10) and not (idx == torch.arange(2000)[:, None]).any()
    assert block["recall_at_k"]["10"] >= 0.95, block
    assert block["params"] == {"hnsw_m": 32, "ef_construction": 40, "ef_search": 128}


def test_ivf_pq_derives_its_parameters_and_finds_neighbours():
    x, y = _clustered(2000, 16, 20, seed=3)
    r = retrieval_metrics(x, y, x, y, exclude_self=True, topk=(1, 10), compute_map=False, knn_backend="faiss_ivf_pq",
                          ann=AnnParams(pq_bits=4, recall_queries=200))
    p = r["ann"]["params"]
    # nlist 4 * sqrt(2000) = 179, capped at 2000 // 39 = 51; pq_m the largest divisor of 16 up to 16 / 4
    assert p == {"nlist": 51, "nprobe": 16, "train_size": 2000, "pq_m": 4, "pq_bits": 4, "refine_factor": 1}
    assert r["ann"]["recall_at_k"]["10"] > 0.3 and r["top1"] > 90.0


@pytest.mark.parametrize("exclude_self", [False, True])
def test_ivf_pq_reranked_over_every_candidate_equals_exact_search(exclude_self):
    # every cell probed and refine_factor * (k + self) >= N candidates re-ranked by exact distance:
    # the exact lists and distances, where the PQ codes alone are not
    x, _ = _clustered(300, 8, 4, seed=6)
    exact_v, exact_i = KNN_BACKENDS.get("torch")(x, x, 5, "l2", exclude_self)
    plain = AnnParams(nlist=4, nprobe=4, pq_m=4, pq_bits=4)
    _, pi = KNN_BACKENDS.get("faiss_ivf_pq")(x, x, 5, "l2", exclude_self, params=plain)
    assert not torch.equal(pi, exact_i)
    reranked = AnnParams(nlist=4, nprobe=4, pq_m=4, pq_bits=4, refine_factor=60)
    av, ai = KNN_BACKENDS.get("faiss_ivf_pq")(x, x, 5, "l2", exclude_self, params=reranked)
    assert torch.equal(ai, exact_i)
    assert torch.allclose(av, exact_v, atol=1e-4, rtol=1e-4)


def test_missing_neighbours_are_misses():
    # an index -1 (IVF found fewer neighbours) must not read the last gallery label
    gl, ql = torch.tensor([3, 7]), torch.tensor([7, 3])
    labels = neighbor_labels(gl, torch.tensor([[-1, 1], [0, -1]]), ql)
    assert labels.tolist() == [[2, 7], [3, 2]]
    assert cmc_from_neighbors(labels, ql, (1, 2)) == {"top1": 50.0, "top2": 100.0}
    # 40 cells of about 8 items, one probed: 20 neighbours cannot all be found
    x, y = _clustered(320, 4, 4, seed=4)
    r = retrieval_metrics(x, y, x, y, exclude_self=True, topk=(1, 20), compute_map=False, knn_backend="faiss_ivf_flat",
                          ann=AnnParams(nlist=40, nprobe=1, recall_queries=50))
    assert r["ann"]["incomplete_lists"] > 0 and r["ann"]["recall_at_k"]["20"] < 1.0


def _eval_params(**ep):
    return {"query_features_path": "q.npz", "gallery_features_path": "q.npz", "eval_params": ep}


@pytest.mark.parametrize("ep, key", [
    ({"knn_backend": "faiss_ivf_flat"}, "eval_params.compute_map"),  # mAP would need the exact pass
    ({"knn_backend": "torch", "ann": {"nprobe": 4}}, "eval_params.ann"),
    ({"knn_backend": "faiss_hnsw", "compute_map": False, "ann": {"nprobe": 0}}, "eval_params.ann.nprobe"),
    ({"knn_backend": "faiss_hnsw", "compute_map": False, "ann": {"nlist": 8, "nprobe": 9}}, "eval_params.ann.nprobe"),
    ({"knn_backend": "faiss_hnsw", "compute_map": False, "ann": {"nprob": 9}}, "eval_params.ann.nprob"),
    ({"knn_backend": "faiss_ivf_pq", "compute_map": False, "ann": {"pq_bits": 17}}, "eval_params.ann.pq_bits"),
    ({"knn_backend": "faiss_hnsw", "compute_map": False, "ann": {"hnsw_m": 1}}, "eval_params.ann.hnsw_m"),
    ({"knn_backend": "faiss_hnsw", "compute_map": False, "ann": {"recall_queries": -1}},
     "eval_params.ann.recall_queries"),
    ({"knn_backend": "faiss_hnsw", "compute_map": False, "ann": {"seed": -1}}, "eval_params.ann.seed"),
    ({"knn_backend": "faiss_ivf_pq", "compute_map": False, "ann": {"refine_factor": 0}},
     "eval_params.ann.refine_factor"),
])
def test_config_errors_name_the_key(ep, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(EvalConfig, _eval_params(**ep))


@pytest.mark.parametrize("backend, params, key", [
    ("faiss_ivf_pq", AnnParams(pq_m=5), "eval_params.ann.pq_m"),  # 5 does not divide 16
    ("faiss_ivf_pq", AnnParams(nlist=2, nprobe=1), "eval_params.ann.pq_bits"),  # 256 codes, 100 vectors
    ("faiss_ivf_flat", AnnParams(nlist=200, nprobe=1), "eval_params.ann.nlist"),  # more cells than vectors
    ("faiss_ivf_flat", AnnParams(nlist=20, nprobe=1, train_size=10), "eval_params.ann.train_size"),
])
def test_parameters_the_data_cannot_serve_name_the_key(backend, params, key):
    x, _ = _clustered(100, 16, 4, seed=5)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        KNN_BACKENDS.get(backend)(x, x, 5, params=params)


def test_library_refuses_map_and_stray_params():
    x, y = _clustered(50, 4, 2, seed=6)
    with pytest.raises(ConfigError, match="compute_map"):
        retrieval_metrics(x, y, x, y, knn_backend="faiss_hnsw")
    with pytest.raises(ConfigError, match=r"eval_params\.ann"):
        retrieval_metrics(x, y, x, y, compute_map=False, knn_backend="faiss", ann=AnnParams())
    with pytest.raises(UserError, match="k=50"):
        KNN_BACKENDS.get("faiss_hnsw")(x, x, 50, exclude_self=True)


def _eval_main():
    import importlib
    import sys

    sys.path.insert(0, str(REPO))
    return importlib.import_module("eval").main


def _write_case(tmp_path, eval_params: str):
    x, y = _clustered(300, 8, 5, seed=7, spread=1.5)
    np.savez(tmp_path / "feats.npz", features=x, labels=y)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        query_features_path: {tmp_path}/feats.npz
        gallery_features_path: {tmp_path}/feats.npz
        results_path: {tmp_path}/res.json
        runtime: {{device: cpu, progress: false}}
        """) + eval_params)
    return cfg, x, y


def test_eval_main_with_ivf_flat_writes_the_ann_block(tmp_path, capsys):
    cfg, x, y = _write_case(tmp_path, "eval_params:\n  knn_backend: faiss_ivf_flat\n  compute_map: false\n"
                                      "  ann: {nlist: 4, nprobe: 4, recall_queries: 100, seed: 1}\n")
    assert run_main(_eval_main(), ["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "res.json").read_text())
    exact = retrieval_metrics(x, y, x, y, exclude_self=True, compute_map=False, knn_backend="faiss")
    assert res["top1"] == exact["top1"] and res["top5"] == exact["top5"] and res["mAP"] is None
    ann = res["ann"]
    assert ann["backend"] == "faiss_ivf_flat" and ann["params"] == {"nlist": 4, "nprobe": 4, "train_size": 256}
    assert ann["recall_at_k"] == {"1": 1.0, "5": 1.0} and ann["queries_sampled"] == 100
    assert ann["build_s"] >= 0 and ann["search_s"] >= 0
    assert "recall@1" in out and "1.000" in out and "faiss_ivf_flat on cpu" in out


@pytest.mark.parametrize("eval_params, fragment", [
    ("eval_params: {knn_backend: faiss_ivf_flat}\n", "eval_params.compute_map"),
    ("eval_params: {knn_backend: faiss_ivf, compute_map: false}\n", "eval_params.knn_backend"),
    ("eval_params: {knn_backend: faiss_ivf_pq, compute_map: false, ann: {pq_m: 3}}\n", "eval_params.ann.pq_m"),
])
def test_eval_main_refuses_bad_settings_in_one_line(tmp_path, capsys, eval_params, fragment):
    cfg, _, _ = _write_case(tmp_path, eval_params)
    assert run_main(_eval_main(), ["--config", str(cfg)]) == 2
    assert fragment in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "res.json").exists()


def test_gpu_index_agrees_with_the_cpu_index():
    import faiss

    if not torch.cuda.is_available() or faiss.get_num_gpus() == 0:
        pytest.skip("needs a CUDA device and a faiss build with GPU support")
    x, _ = _clustered(2000, 16, 10, seed=8)
    params = AnnParams(nlist=8, nprobe=8)
    cpu_v, cpu_i = KNN_BACKENDS.get("faiss_ivf_flat")(x, x, 5, exclude_self=True, params=params)
    gpu_v, gpu_i = KNN_BACKENDS.get("faiss_ivf_flat")(torch.from_numpy(x).cuda(), torch.from_numpy(x).cuda(), 5,
                                                      exclude_self=True, params=params)
    assert gpu_i.is_cuda and (gpu_i.cpu() == cpu_i).float().mean() > 0.99
