"""``compat.py``: the compatibility matrix of a chain of embedding versions (protocols.md §6).

The chain config's versions and edges become an embedding registry (:mod:`fct.compat.versions`),
rebuilt from the config on every run, so a broken claim of compatibility fails before anything is
computed. Every version embeds the evaluation split once; then for each query version i and
gallery version j <= i the gallery is brought into i's space along the registry's edges when a
chain j -> i exists (FCT h, identity), else the queries go into j's space when a chain i -> j exists
(backward maps), else the two are compared as they are (no compatibility mechanism: what
independently trained models give; NaN when their widths differ). Every pair is evaluated with the
exact metrics of ``eval.py`` (leave-one-out, pessimistic ties).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fct.config.chain import ChainConfig
from fct.config.loader import to_dict
from fct.errors import UserError
from fct.io import atomic_write_json, atomic_write_text
from fct.outputs import check_outputs
from fct.report import format_table
from fct.runtime import Runtime, make_runtime

METRICS = ("top1", "top5", "mAP")


def build_registry(cfg: ChainConfig) -> Any:
    """A fresh registry in ``cfg.registry_dir`` holding the chain (paths stored absolute)."""
    from fct.compat.versions import REGISTRY_FILE, Edge, VersionManifest, VersionRegistry
    from fct.models import load_model_file

    root = Path(cfg.registry_dir)
    (root / REGISTRY_FILE).unlink(missing_ok=True)
    reg = VersionRegistry.create(root)
    for v in cfg.versions:
        if not os.path.isfile(v.model_path):
            raise UserError(f"version {v.id}: model file not found: {v.model_path}")
        dim = _embedding_dim(load_model_file(v.model_path, map_location="cpu"), v.model_path)
        manifest = VersionManifest(id=v.id, change=v.change, dim=dim, model_path=os.path.abspath(v.model_path),
                                   data=v.data, compatible_with=tuple(v.compatible_with), parent=v.parent)
        edges = [Edge(e.source, e.target, e.kind, os.path.abspath(e.path) if e.path else None) for e in v.edges]
        reg.add_version(manifest, edges)
    return reg


def _embedding_dim(model: torch.nn.Module, path: str) -> int:
    dim = getattr(model, "embedding_dim", None)
    if isinstance(dim, int):
        return dim
    raise UserError(f"{path}: cannot tell the model's embedding width (no embedding_dim attribute)")


def _route(reg: Any, i: str, j: str) -> tuple[str, list]:
    """How queries of version i meet the gallery of version j: ('gallery', edges j -> i),
    ('query', edges i -> j) or ('none', [])."""
    if i == j:
        return "none", []
    for side, (a, b) in (("gallery", (j, i)), ("query", (i, j))):
        try:
            return side, reg.path(a, b)
        except UserError:
            continue
    return "none", []


def _describe(side: str, edges: list, i: str, j: str) -> str:
    if i == j:
        return "same version"
    if side == "none":
        return "compared as they are (no edge)"
    chain = " then ".join(f"{e.source}->{e.target} {e.kind}" for e in edges)
    return f"{'gallery' if side == 'gallery' else 'queries'} mapped: {chain}"


def check_chain_outputs(cfg: ChainConfig) -> None:
    """Refuse, before any work, output folders that are files, unwritable, or an input."""
    inputs: dict[str, Optional[str]] = {}
    for i, v in enumerate(cfg.versions):
        inputs[f"versions[{i}].model_path"] = v.model_path
        inputs[f"versions[{i}].features_path"] = v.features_path
        for j, e in enumerate(v.edges):
            inputs[f"versions[{i}].edges[{j}].path"] = e.path
    check_outputs(files={}, inputs=inputs, folders={"output_dir": cfg.output_dir, "registry_dir": cfg.registry_dir})


def evaluate_chain(cfg: ChainConfig, rt: Optional[Runtime] = None) -> dict[str, Any]:
    """Compute the matrices of ``cfg``; writes ``matrix.json``, ``matrix.md``, one heat map per
    metric and the projections into ``cfg.output_dir``; returns the JSON dict."""
    from fct.compat.matrix import matrix_summary, plot_matrix
    from fct.retrieval.embeddings import load_feature_file, model_embeddings
    from fct.retrieval import retrieval_metrics

    check_chain_outputs(cfg)
    rt = rt or make_runtime(cfg.runtime)
    ep = cfg.eval_params
    out = Path(cfg.output_dir)
    reg = build_registry(cfg)
    ids = [v.id for v in cfg.versions]
    feats = {v.id: load_feature_file(v.features_path) if v.features_path is not None
             else model_embeddings(v.model_path, cfg.dataset_params, rt) for v in cfg.versions}
    for v in cfg.versions:
        dim = reg.get(v.id).dim
        if v.features_path is not None and feats[v.id].features.shape[1] != dim:
            raise UserError(f"version {v.id}: features_path {v.features_path} holds "
                            f"{feats[v.id].features.shape[1]}-d embeddings, its model {v.model_path} gives {dim}-d")

    def score(q: torch.Tensor, g: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        return retrieval_metrics(q.to(rt.device), labels.to(rt.device), g.to(rt.device), labels.to(rt.device),
                                 metric=ep.distance_metric, exclude_self=True, topk=(1, 5),
                                 compute_map=True, knn_backend=ep.knn_backend, chunk_size=ep.chunk_size)

    n = len(ids)
    mats = {m: np.full((n, n), np.nan) for m in METRICS}
    # metric -> queries with a positive, for a metric some pair leaves undefined (mAP when no query
    # has a positive: all pairs share the images, so then none is defined)
    undefined: dict[str, int] = {}
    routes: list[list[Optional[str]]] = [[None] * n for _ in range(n)]
    for a, i in enumerate(ids):
        for b, j in enumerate(ids[: a + 1]):
            q, g = feats[i], feats[j]
            if not torch.equal(q.labels, g.labels):
                raise UserError(f"versions {i} and {j} embedded different images; use one dataset_params")
            side, edges = _route(reg, i, j)
            qf, gf = q.features, g.features
            if side == "gallery":
                gf = reg.compose(edges)(gf)
            elif side == "query":
                qf = reg.compose(edges)(qf)
            routes[a][b] = _describe(side, edges, i, j)
            if qf.shape[1] != gf.shape[1]:
                routes[a][b] += f" - not comparable ({qf.shape[1]}-d vs {gf.shape[1]}-d)"
                continue
            res = score(qf, gf, q.labels)
            for m in METRICS:
                if res[m] is None:
                    undefined[m] = int(res["queries_with_positives"])
                else:
                    mats[m][a, b] = res[m]

    reference: dict[str, Optional[dict[str, float]]] = {}
    for v in cfg.versions:
        if v.reference_model_path:
            same = os.path.realpath(v.reference_model_path) == os.path.realpath(v.model_path)
            r = feats[v.id] if same else model_embeddings(v.reference_model_path, cfg.dataset_params, rt)
            res = score(r.features, r.features, r.labels)
            reference[v.id] = {m: res[m] for m in METRICS}
    result: dict[str, Any] = {"versions": ids, "routes": routes, "config": to_dict(cfg),
                              "registry": str(reg.file), "headline_metric": cfg.headline_metric}
    for m in METRICS:
        if m in undefined:
            result[m] = _undefined_summary(m, ids, undefined[m])
            continue
        ref = [reference[i][m] if i in reference and reference[i] else None for i in ids]
        result[m] = matrix_summary(mats[m], ids, m, ref)
        plot_matrix(mats[m], ids, out / f"matrix_{m}.png", title=f"{m} (%): query version (rows) x gallery version")
    if cfg.projection:
        from fct.compat.projection import plot_projection

        for a in range(1, n):
            i, j = ids[a - 1], ids[a]
            plot_projection(feats[i].features.numpy(), feats[j].features.numpy(), feats[i].labels.numpy(),
                            [i, j], out / f"projection_{i}_{j}.png", seed=0)
    atomic_write_json(result, out / "matrix.json")
    table = _table(result, ids, cfg.headline_metric)
    atomic_write_text(table + "\n", out / "matrix.md")
    print(table)
    print(f"results in {out / 'matrix.json'}, heat maps {out / 'matrix_<metric>.png'}", flush=True)
    return result


def _undefined_summary(metric: str, ids: list[str], with_positives: int) -> dict[str, Any]:
    """The JSON entry of a metric no pair defines: nulls and the reason (never NaN)."""
    return {"metric": metric, "versions": ids, "matrix": None, "AC": None, "AM": None,
            "queries_with_positives": with_positives,
            "note": f"{metric} undefined: {with_positives} queries have a positive in the gallery"}


def _table(result: dict[str, Any], ids: list[str], metric: str) -> str:
    summary = result[metric]
    if summary["matrix"] is None:
        return f"{metric}: n/a ({summary['note']})"
    rows = [[f"query {i}"] + [summary["matrix"][a][b] for b in range(len(ids))] for a, i in enumerate(ids)]
    head = format_table([f"{metric} (%)"] + [f"gallery {j}" for j in ids], rows)
    crit = [[p["query"], p["gallery"], p["value"], p["old_old"], "yes" if p["compatible"] else "no",
             p["update_gain"]] for p in summary["pair_details"]]
    pairs = format_table(["new", "old", "new/old", "old/old", "compatible", "update gain"], crit)
    ac, am = summary["AC"], summary["AM"]
    return f"{head}\n\n{pairs}\n\nAC {ac if ac is None else round(ac, 3)}  AM {am if am is None else round(am, 2)}"
