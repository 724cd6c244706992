"""Approximate k-nearest-neighbour search with FAISS (IVF-Flat, IVF-PQ, HNSW) and its recall@k
against exact search, for galleries the exact engine cannot serve.

The backends ``faiss_ivf_flat``, ``faiss_ivf_pq`` and ``faiss_hnsw`` join ``KNN_BACKENDS`` with
the common contract of ``fct.retrieval.knn`` (values, indices nearest first; ``exclude_self``:
query i never returns gallery item i) plus a keyword ``params`` (an ``AnnParams``). Where an index
finds fewer than k neighbours for a query (IVF with few, small cells probed) the missing entries
are index -1. Values are the index's own distances: exact for IVF-Flat and HNSW, quantised for
IVF-PQ (exact with ``refine_factor`` > 1, which re-ranks refine_factor * k PQ candidates by their
exact distances to the stored vectors, on the CPU even when the IVF-PQ part is on the GPU). ``cosine`` L2-normalises both sides and searches by inner product, as the exact backends.

Recall@k of a query is the fraction of its first k approximate neighbours that belong to an
exact top-k: a neighbour counts when its exact ranking key is no worse than the exact k-th key.
Without ties at the k-th place that is |approximate top-k & exact top-k| / k; with ties, any of
the exact answers counts in full, so recall does not depend on how either side breaks ties. The
exact keys are those of the torch engine (``knn_torch``: one float32 matmul, no TF32).

IVF indexes are built and searched on the GPU when the run's tensors are on CUDA and faiss has
GPU support (``faiss.get_num_gpus() > 0``); HNSW has no faiss GPU implementation and stays on
the CPU. An IVF index is trained (k-means, and PQ codebooks) on a seeded sample of the gallery.
An HNSW graph built with several threads depends on their timing (faiss inserts in parallel), so
its results can differ slightly from run to run; IVF results do not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from fct.config.evaluation import APPROXIMATE_KNN_BACKENDS, AnnParams
from fct.errors import ConfigError, UserError
from fct.registry import Registry
from fct.retrieval.knn import (KNN_BACKENDS, as_float_tensor, auto_chunk, check_chunk, check_pair, drop_self,
                               full_precision_matmul, import_faiss, normalize)

# (faiss module, gallery size N, width D, faiss metric, params) -> (untrained index set up for search,
# the parameter values it uses)
IndexBuilder = Callable[[Any, int, int, int, AnnParams], tuple[Any, dict[str, int]]]
ANN_INDEXES: Registry[IndexBuilder] = Registry("approximate index")
# faiss has GPU versions of these (index_cpu_to_gpu); the others stay on the CPU
GPU_INDEXES = ("faiss_ivf_flat", "faiss_ivf_pq")


def _ivf_params(p: AnnParams, n: int) -> dict[str, int]:
    """nlist, nprobe and train_size for a gallery of n vectors (null values derived)."""
    if p.nlist is None:
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
        nprobe = min(p.nprobe, nlist)
    else:
        nlist, nprobe = p.nlist, p.nprobe
        if nlist > n:
            raise ConfigError(f"eval_params.ann.nlist={nlist} exceeds the gallery's {n} vectors "
                              "(k-means needs a training vector per cell)")
    train = min(n, p.train_size if p.train_size is not None else 64 * nlist)
    if train < nlist:
        raise ConfigError(f"eval_params.ann.train_size={train} is below nlist={nlist} "
                          "(k-means needs a training vector per cell)")
    return {"nlist": nlist, "nprobe": nprobe, "train_size": train}


@ANN_INDEXES.register("faiss_ivf_flat")
def _ivf_flat(faiss: Any, n: int, d: int, metric: int, p: AnnParams) -> tuple[Any, dict[str, int]]:
    r = _ivf_params(p, n)
    index = faiss.IndexIVFFlat(faiss.IndexFlat(d, metric), d, r["nlist"], metric)
    index.cp.seed = p.seed
    index.nprobe = r["nprobe"]
    return index, r


@ANN_INDEXES.register("faiss_ivf_pq")
def _ivf_pq(faiss: Any, n: int, d: int, metric: int, p: AnnParams) -> tuple[Any, dict[str, int]]:
    r = _ivf_params(p, n)
    pq_m = p.pq_m if p.pq_m is not None else max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)
    if d % pq_m:
        raise ConfigError(f"eval_params.ann.pq_m={pq_m} must divide the embedding width {d}")
    if r["train_size"] < 2**p.pq_bits:
        raise ConfigError(f"eval_params.ann.pq_bits={p.pq_bits} needs at least {2**p.pq_bits} training vectors "
                          f"(one per code), the gallery sample has {r['train_size']} "
                          "(eval_params.ann.train_size)")
    index = faiss.IndexIVFPQ(faiss.IndexFlat(d, metric), d, r["nlist"], pq_m, p.pq_bits, metric)
    index.cp.seed = p.seed
    index.pq.cp.seed = p.seed
    index.nprobe = r["nprobe"]
    return index, {**r, "pq_m": pq_m, "pq_bits": p.pq_bits, "refine_factor": p.refine_factor}


@ANN_INDEXES.register("faiss_hnsw")
def _hnsw(faiss: Any, n: int, d: int, metric: int, p: AnnParams) -> tuple[Any, dict[str, int]]:
    index = faiss.IndexHNSWFlat(d, p.hnsw_m, metric)
    index.hnsw.efConstruction = p.ef_construction
    index.hnsw.efSearch = p.ef_search
    return index, {"hnsw_m": p.hnsw_m, "ef_construction": p.ef_construction, "ef_search": p.ef_search}


@dataclass
class AnnIndex:
    """A built index over a gallery of ``size`` vectors (already L2-normalised for cosine)."""

    backend: str
    index: Any  # the faiss index, on the GPU when ``device`` says so
    params: dict[str, int]  # the values the index uses, nulls derived
    device: str  # "cpu" or "cuda:<i>"
    build_s: float  # training and adding, seconds
    size: int
    gpu_resources: Any = None  # faiss GPU resources: they must live as long as the index
    base: Any = None  # the IVF-PQ index inside a re-ranking (refine) index: kept alive with it


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def _to_gpu(faiss: Any, index: Any, backend: str, device: torch.device) -> tuple[Any, Any, str]:
    """(index, GPU resources, device name): an IVF index goes to the run's GPU when faiss has GPU
    support; everything else stays on the CPU."""
    if device.type != "cuda" or backend not in GPU_INDEXES or faiss.get_num_gpus() == 0:
        return index, None, "cpu"
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    res = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(res, gpu, index), res, f"cuda:{gpu}"
    except RuntimeError as e:  # e.g. an IVF-PQ code size the GPU kernels do not support
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"knn_backend {backend!r}: faiss cannot put this index on the GPU ({reason}); "
                        "change eval_params.ann or run on the CPU (runtime.device: cpu)") from None


def build_index(gallery: torch.Tensor, backend: str, metric: str, params: AnnParams) -> AnnIndex:
    """Train (on a seeded sample) and fill the ``backend`` index with gallery (Ng, D), which must
    already be L2-normalised for ``metric='cosine'``; on its GPU when it lives on one (see module)."""
    build = ANN_INDEXES.get(backend)
    faiss = import_faiss(backend)
    g = _numpy(gallery)
    n, d = g.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index, resolved = build(faiss, n, d, faiss_metric, params)
    t0 = time.perf_counter()
    index, res, device = _to_gpu(faiss, index, backend, gallery.device)
    if not index.is_trained:
        train = resolved["train_size"]
        if train < n:
            rows = np.sort(np.random.default_rng(params.seed).choice(n, size=train, replace=False))
            index.train(g[rows])
        else:
            index.train(g)
    base = None
    if resolved.get("refine_factor", 1) > 1:
        base, index = index, faiss.IndexRefineFlat(index)
        index.k_factor = float(resolved["refine_factor"])
    index.add(g)
    return AnnIndex(backend, index, resolved, device, time.perf_counter() - t0, n, res, base)


def search_index(ann: AnnIndex, query: torch.Tensor, k: int,
                 exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """values, indices (Nq, k) nearest first (-1: not found) of query (Nq, D), prepared like the
    gallery; ``exclude_self`` drops query i's own gallery item i."""
    values, indices = ann.index.search(_numpy(query), k + int(exclude_self))
    if exclude_self:
        values, indices = drop_self(values, indices, k)
    return values, indices.astype(np.int64, copy=False)


def index_bytes(ann: AnnIndex) -> int:
    """The index's size as faiss stores it (vectors or codes, lists, graph), in bytes."""
    faiss = import_faiss(ann.backend)
    if ann.base is not None and ann.device != "cpu":  # a GPU IVF-PQ inside a CPU re-ranking index
        return (int(faiss.serialize_index(faiss.index_gpu_to_cpu(ann.base)).nbytes)
                + ann.size * ann.index.d * 4)
    index = faiss.index_gpu_to_cpu(ann.index) if ann.device != "cpu" else ann.index
    return int(faiss.serialize_index(index).nbytes)


def _prepare(query: Any, gallery: Any, k: int, metric: str,
             exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = as_float_tensor(query, "query")
    g = as_float_tensor(gallery, "gallery")
    check_pair(q, g, metric, exclude_self)
    available = g.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise UserError(f"k={k} neighbours requested but the gallery offers {available} per query")
    return (normalize(q), normalize(g)) if metric == "cosine" else (q, g)


def recall_sample(num_queries: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(size, num_queries)`` queries drawn without replacement by ``seed``."""
    if size >= num_queries:
        return np.arange(num_queries)
    return np.sort(np.random.default_rng(seed).choice(num_queries, size=size, replace=False))


def _recall(q: torch.Tensor, g: torch.Tensor, approx: torch.Tensor, own: torch.Tensor, ks: Sequence[int],
            metric: str, exclude_self: bool, chunk_size: Optional[int]) -> dict[int, float]:
    """Recall@k of approx (S, K >= max ks) for the prepared queries q (S, D) against the prepared
    gallery g (Ng, D); own (S,): each query's own gallery item (masked under exclude_self)."""
    k_max = max(ks)
    largest = metric == "cosine"
    g_sq = (g * g).sum(1)[None, :] if not largest else None  # the key of knn_torch: ||g||^2 - 2 q.g
    gt = g.t()
    s_total = q.shape[0]
    hits = dict.fromkeys(ks, 0)
    c = chunk_size or auto_chunk(s_total, g.shape[0], 12, q.device)
    with full_precision_matmul():
        for s in range(0, s_total, c):
            e = min(s + c, s_total)
            block = torch.addmm(g_sq, q[s:e], gt, alpha=-2.0) if g_sq is not None else q[s:e] @ gt
            if exclude_self:
                block[torch.arange(e - s, device=q.device), own[s:e]] = float("-inf") if largest else float("inf")
            kth = torch.topk(block, k_max, dim=1, largest=largest, sorted=True).values
            a = approx[s:e, :k_max]
            found = block.gather(1, a.clamp(min=0))
            for k in ks:
                within = found[:, :k] >= kth[:, k - 1:k] if largest else found[:, :k] <= kth[:, k - 1:k]
                hits[k] += int((within & (a[:, :k] >= 0)).sum())
    return {k: hits[k] / (s_total * k) for k in ks}


def sampled_recall(query: Any, gallery: Any, approx_indices: Any, ks: Sequence[int], *, metric: str = "l2",
                   exclude_self: bool = False, sample: Optional[Any] = None,
                   chunk_size: Optional[int] = None) -> dict[int, float]:
    """Recall@k (a fraction) of approximate neighbour lists against exact search, per k in ks.

    query (Nq, D), gallery (Ng, D); approx_indices (Nq, K) int, nearest first, -1 for none, K >= max(ks);
    sample: the query indices to check (default all). See the module docstring for the definition.
    """
    ks = sorted({int(k) for k in ks})
    q, g = _prepare(query, gallery, max(ks), metric, exclude_self)
    check_chunk(chunk_size)
    approx = torch.as_tensor(approx_indices, dtype=torch.int64).to(q.device)
    if approx.dim() != 2 or approx.shape[0] != q.shape[0] or approx.shape[1] < max(ks):
        raise UserError(f"approximate neighbour lists must be (Nq={q.shape[0]}, >= {max(ks)}), "
                        f"got {tuple(approx.shape)}")
    rows = torch.as_tensor(np.arange(q.shape[0]) if sample is None else sample, dtype=torch.int64).to(q.device)
    return _recall(q[rows], g, approx[rows], rows, ks, metric, exclude_self, chunk_size)


def approximate_search(query: torch.Tensor, gallery: torch.Tensor, k: int, ks: Sequence[int], *, backend: str,
                       metric: str, exclude_self: bool, params: AnnParams,
                       chunk_size: Optional[int] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """k approximate neighbours of every query, and the results' ``ann`` block.

    query (Nq, D), gallery (Ng, D) -> indices (Nq, k) int64 on the query's device (-1: not found)
    and ``{'backend', 'params', 'device', 'build_s', 'search_s', 'recall_at_k': {str(k): fraction}
    for each k in ks (capped at k; None when recall_queries is 0), 'queries_sampled', 'recall_s',
    'incomplete_lists': queries with fewer than k neighbours found}``.
    """
    q, g = _prepare(query, gallery, k, metric, exclude_self)
    check_chunk(chunk_size)
    ann = build_index(g, backend, metric, params)
    t0 = time.perf_counter()
    _, idx_np = search_index(ann, q, k, exclude_self)
    search_s = time.perf_counter() - t0
    idx = torch.from_numpy(idx_np).to(q.device)
    sample = recall_sample(q.shape[0], params.recall_queries, params.seed)
    recall: Optional[dict[str, float]] = None
    t0 = time.perf_counter()
    if len(sample):
        rows = torch.from_numpy(sample).to(q.device)
        by_k = _recall(q[rows], g, idx[rows], rows, sorted({min(kk, k) for kk in ks}), metric, exclude_self,
                       chunk_size)
        recall = {str(kk): by_k[min(kk, k)] for kk in ks}
    block = {"backend": backend, "params": ann.params, "device": ann.device, "build_s": ann.build_s,
             "search_s": search_s, "recall_at_k": recall, "queries_sampled": int(len(sample)),
             "recall_s": time.perf_counter() - t0, "incomplete_lists": int((idx < 0).any(1).sum())}
    return idx, block


def _knn_backend(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def knn(query: torch.Tensor, gallery: torch.Tensor, k: int, metric: str = "l2", exclude_self: bool = False,
            chunk_size: Optional[int] = None,
            params: Optional[AnnParams] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate k-NN (see fct.retrieval.ann): values (Nq, k) float32, indices (Nq, k) int64
        (-1: not found) on the query's device. ``chunk_size`` is accepted for a common signature."""
        q, g = _prepare(query, gallery, k, metric, exclude_self)
        ann = build_index(g, backend, metric, params or AnnParams())
        values, indices = search_index(ann, q, k, exclude_self)
        return torch.from_numpy(np.ascontiguousarray(values)).to(q.device), torch.from_numpy(indices).to(q.device)

    knn.__name__ = knn.__qualname__ = f"knn_{backend}"
    return knn


for _name in APPROXIMATE_KNN_BACKENDS:
    KNN_BACKENDS.register(_name)(_knn_backend(_name))
