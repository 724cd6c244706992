"""Retrieval metrics, defined on the per-query ranks of the exact engine (``fct.retrieval.engine``).

* CMC top-k: the percentage of all queries whose nearest positive ranks k or better (a query
  without any positive is a miss).
* mAP: the mean AP, as a percentage, over the queries that have at least one positive; None
  (JSON null, never NaN) when no query has one. ``queries_with_positives`` says how many do.
* Per class: CMC top-k over the queries of each class, with the counts behind it.

Ranks follow the engine's conventions (protocols.md section 1): pessimistic ties, leave-one-out
by ``exclude_self``. ``knn_backend='faiss'`` takes CMC from FAISS neighbour lists instead (its own
tie order), see :func:`cmc_from_neighbors`; the approximate backends (``fct.retrieval.ann``) take
it from their index's lists, add its recall@k against exact search, and give no mAP.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from fct.config.evaluation import APPROXIMATE_KNN_BACKENDS, AnnParams
from fct.errors import ConfigError, UserError
from fct.retrieval.ann import approximate_search
from fct.retrieval.engine import QueryRanks, check_inputs, queries_with_positives, rank_queries
from fct.retrieval.knn import KNN_BACKENDS


def check_topk(topk: Sequence[int]) -> tuple[int, ...]:
    """The k of CMC top-k as ints; UserError for a k below 1."""
    ks = tuple(int(k) for k in topk)
    if any(k < 1 for k in ks):
        raise UserError(f"topk values must be positive integers, got {tuple(topk)}")
    return ks


def cmc_from_neighbors(
    neighbor_labels: Any, query_labels: Any, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """CMC from neighbour lists: neighbor_labels (Nq, k) nearest first, query_labels (Nq,).

    Returns ``{'top<k>': percent}``; a query is a top-k hit when any of its first k
    neighbours has its label. Ties are as the neighbour search ordered them.
    """
    nl = torch.as_tensor(neighbor_labels)
    ql = torch.as_tensor(query_labels).to(nl.device)
    ks = check_topk(topk)
    if nl.dim() != 2 or ql.dim() != 1 or nl.shape[0] != ql.shape[0]:
        raise UserError(
            f"neighbour labels (Nq, k) and query labels (Nq,) disagree: "
            f"{tuple(nl.shape)} vs {tuple(ql.shape)}"
        )
    if max(ks) > nl.shape[1]:
        raise UserError(f"top-{max(ks)} asked but only {nl.shape[1]} neighbours per query given")
    match = nl == ql[:, None]
    first_hit = torch.where(
        match.any(1), match.to(torch.int8).argmax(1), torch.full_like(ql, nl.shape[1])
    )
    n = max(ql.shape[0], 1)
    return {f"top{k}": 100.0 * float((first_hit < k).sum()) / n for k in ks}


def neighbor_labels(gallery_labels: torch.Tensor, indices: torch.Tensor,
                    query_labels: torch.Tensor) -> torch.Tensor:
    """Labels (Nq, k) of neighbour lists indices (Nq, k); an index -1 (an approximate index found
    no more neighbours) gets a label no query has, so it is never a hit."""
    idx = indices.to(gallery_labels.device)
    none = query_labels.min() - 1 if query_labels.numel() else 0
    return torch.where(idx >= 0, gallery_labels[idx.clamp(min=0)], none)


def cmc(ranks: QueryRanks, topk: Sequence[int]) -> dict[str, float]:
    """``{'top<k>': percent of all queries whose nearest positive ranks k or better}``."""
    rank = ranks.first_positive_rank
    nq = rank.shape[0]
    return {f"top{k}": 100.0 * int(((rank >= 1) & (rank <= k)).sum()) / nq for k in check_topk(topk)}


def mean_average_precision(ranks: QueryRanks) -> Optional[float]:
    """mAP in percent over the queries with a positive; None when none has one."""
    if ranks.ap is None:
        raise ValueError("these ranks were computed without AP (compute_map=False)")
    n_pos = ranks.queries_with_positives()
    has = ranks.num_positives > 0
    return 100.0 * float(ranks.ap[has].sum()) / n_pos if n_pos else None


def per_class_cmc(ranks: QueryRanks, labels: torch.Tensor,
                  topk: Sequence[int]) -> dict[str, dict[str, float | int]]:
    """CMC top-k per query class (labels (Nq,)), with the class's query count and how many of
    them have a positive (a query without one is a miss, so a class of 0 such queries scores 0
    for a reason the counts make visible)."""
    rank = ranks.first_positive_rank.cpu()
    labels = labels.cpu()
    out: dict[str, dict[str, float | int]] = {}
    for c in torch.unique(labels).tolist():
        r = rank[labels == c]
        entry: dict[str, float | int] = {f"top{k}": 100.0 * ((r >= 1) & (r <= k)).float().mean().item()
                                         for k in topk}
        entry["queries"] = int(len(r))
        entry["queries_with_positives"] = int((r >= 1).sum())
        out[str(c)] = entry
    return out


def needs_exact_pass(compute_map: bool, knn_backend: str) -> bool:
    """Whether :func:`retrieval_metrics` needs the engine's ranks: for mAP, and for CMC unless a
    neighbour-list backend (FAISS) gives it."""
    return compute_map or knn_backend == "torch"


def retrieval_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metric: str = "l2",
    exclude_self: bool = False,
    topk: Sequence[int] = (1, 5),
    compute_map: bool = True,
    knn_backend: str = "torch",
    chunk_size: int | None = None,
    progress: bool = False,
    ranks: Optional[QueryRanks] = None,
    ann: Optional[AnnParams] = None,
) -> dict[str, Any]:
    """CMC top-k and full mAP (percentages) of a query set against a gallery.

    query (Nq, D), query_labels (Nq,), gallery (Ng, D), gallery_labels (Ng,): tensors (on any
    one device) or numpy arrays; features are used as float32, labels as int64.
    Returns ``{'top1': .., 'top5': .. (one per k in topk), 'mAP': .. or None when
    compute_map is False or no query has a positive (mAP undefined), 'num_queries': Nq,
    'queries_with_positives': queries with at least one positive, 'num_map_queries': the
    same count, None without mAP}``, and ``'ann'`` with an approximate backend (below). No value is
    ever NaN (results go to strict JSON).

    knn_backend 'torch' takes everything from the engine's exact pass (pessimistic ties);
    'faiss' takes CMC from FAISS neighbour lists (its own tie order) and mAP from the pass.
    The approximate backends (faiss_ivf_flat, faiss_ivf_pq, faiss_hnsw) take CMC from their index's
    lists, configured by ``ann`` (None: defaults), and add ``'ann'``: the index's parameters,
    build and search seconds, and recall@k against exact search on a sample of the queries
    (:func:`fct.retrieval.ann.approximate_search`). They refuse ``compute_map``: full mAP needs
    the exact pass over the whole gallery, which is what they are meant to avoid.
    ranks: the engine's :func:`rank_queries` result for these same inputs (with AP when
    ``compute_map``) when the caller already has it; else the pass runs here if needed.
    """
    q, ql, g, gl = check_inputs(query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size)
    ks = check_topk(topk)
    knn_fn = KNN_BACKENDS.get(knn_backend)
    approximate = knn_backend in APPROXIMATE_KNN_BACKENDS
    if approximate and compute_map:
        raise ConfigError(f"eval_params.compute_map: mAP needs the exact pass over the whole gallery, "
                          f"which knn_backend {knn_backend!r} is meant to avoid; set compute_map false "
                          "(CMC top-k and recall@k) or use an exact backend (torch, faiss)")
    if ann is not None and not approximate:
        raise ConfigError(f"eval_params.ann applies to the approximate backends, "
                          f"not to knn_backend {knn_backend!r}")
    nq = q.shape[0]
    if ranks is None and needs_exact_pass(compute_map, knn_backend):
        ranks = rank_queries(q, ql, g, gl, metric=metric, exclude_self=exclude_self, compute_map=compute_map,
                             chunk_size=chunk_size, progress=progress)
    result: dict[str, Any] = {}
    ann_block: Optional[dict[str, Any]] = None
    if knn_backend == "torch":
        assert ranks is not None
        result.update(cmc(ranks, ks))
    else:
        # Beyond the gallery's size a longer list cannot change a hit: cap k there.
        k_max = min(max(ks), g.shape[0] - int(exclude_self))
        if approximate:
            idx, ann_block = approximate_search(q, g, k_max, ks, backend=knn_backend, metric=metric,
                                                exclude_self=exclude_self, params=ann or AnnParams(),
                                                chunk_size=chunk_size)
        else:
            _, idx = knn_fn(q, g, k_max, metric=metric, exclude_self=exclude_self, chunk_size=chunk_size)
        neighbour_cmc = cmc_from_neighbors(neighbor_labels(gl, idx, ql), ql, sorted({min(k, k_max) for k in ks}))
        for k in ks:
            result[f"top{k}"] = neighbour_cmc[f"top{min(k, k_max)}"]
    n_pos = ranks.queries_with_positives() if ranks is not None else queries_with_positives(ql, gl, exclude_self)
    result["mAP"] = None
    if compute_map:
        assert ranks is not None
        result["mAP"] = mean_average_precision(ranks)
    result["num_map_queries"] = n_pos if compute_map else None
    result["num_queries"] = nq
    result["queries_with_positives"] = n_pos
    if ann_block is not None:
        result["ann"] = ann_block
    return result
