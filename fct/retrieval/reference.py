"""A deliberately plain retrieval evaluation, for tests and benchmarks only.

It builds the full (Nq, Ng) distance matrix in float64 numpy, sorts every row and computes each
query's AP in a Python loop. Ties follow the same pessimistic convention as
``fct.retrieval.engine``: rows are lexsorted by (distance, is_positive), so a negative tied with
a positive comes first. O(Nq x Ng) memory: never use it on a real evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _np(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(dtype)


def naive_distances(query: Any, gallery: Any, metric: str = "l2") -> np.ndarray:
    """(Nq, Ng) float64: squared L2 distances, or minus the cosine similarity (smaller = nearer)."""
    # Features are taken as float32 first, as the fast path sees them.
    q = _np(query, np.float32).astype(np.float64)
    g = _np(gallery, np.float32).astype(np.float64)
    if metric == "l2":
        return (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * q @ g.T
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return -(qn @ gn.T)
    raise ValueError(f"unknown metric {metric!r}")


def naive_retrieval_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metric: str = "l2",
    exclude_self: bool = False,
    topk: Sequence[int] = (1, 5),
    compute_map: bool = True,
) -> dict[str, float | int | None]:
    """Same keys and conventions as ``retrieval_metrics``; see the module docstring."""
    dist = naive_distances(query, gallery, metric)
    ql = _np(query_labels, np.int64)
    gl = _np(gallery_labels, np.int64)
    nq, ng = dist.shape
    hits = np.zeros(len(topk), dtype=np.int64)
    aps: list[float] = []
    with_positive = 0
    for i in range(nq):
        cols = np.arange(ng)
        if exclude_self:
            cols = cols[cols != i]
        d = dist[i, cols]
        is_pos = gl[cols] == ql[i]
        if not is_pos.any():
            continue  # a CMC miss, and no AP
        with_positive += 1
        # lexsort's last key is the primary one: distance, then negatives (False) first.
        ranked_pos = is_pos[np.lexsort((is_pos, d))]
        for t, k in enumerate(topk):
            hits[t] += bool(ranked_pos[:k].any())
        if compute_map:
            ranks = np.flatnonzero(ranked_pos) + 1  # 1-based ranks of the positives
            aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    out: dict[str, float | int | None] = {f"top{k}": 100.0 * hits[t] / nq for t, k in enumerate(topk)}
    out["mAP"] = 100.0 * float(np.mean(aps)) if compute_map and aps else None
    out["num_queries"] = nq
    out["num_map_queries"] = len(aps) if compute_map else None
    out["queries_with_positives"] = with_positive
    return out
