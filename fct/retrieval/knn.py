"""Exact k-nearest-neighbour search: a chunked torch backend and a FAISS backend. The approximate
FAISS backends (IVF-Flat, IVF-PQ, HNSW) join the same registry from ``fct.retrieval.ann``.

Every backend in ``KNN_BACKENDS`` has the signature

    backend(query (Nq, D), gallery (Ng, D), k, metric, exclude_self, chunk_size=None)
        -> (values (Nq, k), indices (Nq, k) int64), nearest first

where ``values`` are squared L2 distances (ascending) for ``metric='l2'`` and inner products of
the L2-normalised vectors (descending) for ``metric='cosine'``. ``exclude_self`` (it needs
Nq == Ng) means query i never returns gallery item i.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fct.config.evaluation import APPROXIMATE_KNN_BACKENDS
from fct.errors import ConfigError, UserError
from fct.registry import Registry

METRICS = ("l2", "cosine")

# Working memory allowed for one chunk of query rows (all per-chunk buffers together). Larger
# chunks mean fewer, larger multi-threaded ops, which matters most on a loaded machine; on the
# CPU the gain flattens out well before memory becomes a concern (bench_eval.py measures it).
# On CUDA, larger blocks keep the GPU busy.
CPU_CHUNK_BYTES = 256 * 2**20
CUDA_CHUNK_BYTES = 2 * 2**30

KnnFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class KnnRegistry(Registry[KnnFn]):
    """The k-NN backends; an unknown name lists the exact backends apart from the approximate
    ones (which give no mAP), so the choice is clear from the message alone."""

    def get(self, name: str) -> KnnFn:
        if name in self:
            return super().get(name)
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        exact = [n for n in self.names() if n not in APPROXIMATE_KNN_BACKENDS]
        approximate = [n for n in self.names() if n in APPROXIMATE_KNN_BACKENDS]
        groups = f"{', '.join(exact)} (exact)"
        if approximate:
            groups += f"; {', '.join(approximate)} (approximate)"
        raise ConfigError(f"unknown {self.kind} {name!r}{hint}; valid: {groups}")


KNN_BACKENDS = KnnRegistry("k-NN backend")


def as_float_tensor(x: Any, name: str) -> torch.Tensor:
    """A (N, D) float32 tensor from a tensor or an array; it stays on its device."""
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise UserError(f"{name} must be a 2-D (N, D) array of features, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise UserError(f"{name} must hold floating-point features, got {t.dtype}")
    t = t.to(torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{name} contains NaN or infinite values")
    return t


def check_pair(query: torch.Tensor, gallery: torch.Tensor, metric: str, exclude_self: bool) -> None:
    """Fail with one clear message on inputs no backend can rank."""
    if metric not in METRICS:
        raise UserError(f"unknown distance metric {metric!r}; valid: {', '.join(METRICS)}")
    if query.shape[0] == 0 or gallery.shape[0] == 0:
        raise UserError(f"empty query set or gallery (Nq={query.shape[0]}, Ng={gallery.shape[0]})")
    if query.shape[1] != gallery.shape[1]:
        raise UserError(
            f"query features have dimension {query.shape[1]} but gallery features {gallery.shape[1]}"
        )
    if query.device != gallery.device:
        raise UserError(f"query is on {query.device} but gallery on {gallery.device}")
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise UserError(
            "exclude_self (leave-one-out) needs the query set to be the gallery, "
            f"got Nq={query.shape[0]} and Ng={gallery.shape[0]}"
        )


def check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise UserError(f"chunk_size must be a positive number of query rows, got {chunk_size}")


def auto_chunk(num_rows: int, num_gallery: int, bytes_per_entry: int, device: torch.device) -> int:
    """Query rows per chunk so that a chunk's buffers, (rows, Ng) each, fit the memory budget."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(num_rows, budget // (bytes_per_entry * max(num_gallery, 1))))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (not the L1 norm of the reference implementation)."""
    return F.normalize(x, p=2.0, dim=1, eps=1e-12)


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Plain float32 matmuls inside (no TF32/bf16 shortcuts a training script may have
    enabled): lower precision would reorder near-tied neighbours."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _check_k(k: int, num_gallery: int, exclude_self: bool) -> None:
    available = num_gallery - int(exclude_self)
    if not 1 <= k <= available:
        raise UserError(f"k={k} neighbours requested but the gallery offers {available} per query")


@KNN_BACKENDS.register("torch")
def knn_torch(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str = "l2",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN by chunked matmul + topk on the tensors' device; memory O(chunk x Ng).

    query (Nq, D), gallery (Ng, D) -> values (Nq, k) float32, indices (Nq, k) int64.
    Among exactly tied candidates the order is whatever ``torch.topk`` returns.
    """
    q = as_float_tensor(query, "query")
    g = as_float_tensor(gallery, "gallery")
    check_pair(q, g, metric, exclude_self)
    _check_k(k, g.shape[0], exclude_self)
    check_chunk(chunk_size)
    nq, ng = q.shape[0], g.shape[0]
    if metric == "cosine":
        q, g = normalize(q), normalize(g)
    gt = g.t()
    # ||q - g||^2 = ||q||^2 + (||g||^2 - 2 q.g): the bracket alone orders a row, ||q||^2 is
    # added to the k winners only.
    g_sq = (g * g).sum(1)[None, :] if metric == "l2" else None
    c = chunk_size or auto_chunk(nq, ng, 12, q.device)
    buf = torch.empty((min(c, nq), ng), dtype=torch.float32, device=q.device)
    values = torch.empty((nq, k), dtype=torch.float32, device=q.device)
    indices = torch.empty((nq, k), dtype=torch.int64, device=q.device)
    with full_precision_matmul():
        _knn_chunks(q, gt, g_sq, k, exclude_self, c, buf, values, indices)
    return values, indices


def _knn_chunks(
    q: torch.Tensor,
    gt: torch.Tensor,
    g_sq: torch.Tensor | None,
    k: int,
    exclude_self: bool,
    c: int,
    buf: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
) -> None:
    """Fill values/indices (Nq, k) chunk by chunk; see ``knn_torch``."""
    nq = q.shape[0]
    for s in range(0, nq, c):
        e = min(s + c, nq)
        qc = q[s:e]
        block = buf[: e - s]
        if g_sq is not None:
            torch.addmm(g_sq, qc, gt, alpha=-2.0, out=block)
        else:
            torch.mm(qc, gt, out=block)
        if exclude_self:
            rows = torch.arange(e - s, device=q.device)
            block[rows, rows + s] = float("inf") if g_sq is not None else float("-inf")
        v, i = torch.topk(block, k, dim=1, largest=g_sq is None, sorted=True)
        if g_sq is not None:
            v = (v + (qc * qc).sum(1, keepdim=True)).clamp_min_(0.0)
        values[s:e] = v
        indices[s:e] = i


def import_faiss(backend: str = "faiss") -> Any:
    """The faiss module; a UserError naming ``backend`` when it is not installed."""
    try:
        import faiss  # imported lazily: an optional dependency
    except ImportError:
        raise UserError(
            f"k-NN backend {backend!r} needs the faiss package (pip install faiss-cpu, or faiss-gpu); "
            "or use the exact 'torch' backend"
        ) from None
    return faiss


@KNN_BACKENDS.register("faiss")
def knn_faiss(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str = "l2",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN with a flat FAISS index (on all GPUs when FAISS sees any).

    Same contract as ``knn_torch``; results come back on the query's device. ``chunk_size``
    is accepted for a common signature; FAISS does its own blocking.
    """
    faiss = import_faiss()
    q = as_float_tensor(query, "query")
    g = as_float_tensor(gallery, "gallery")
    check_pair(q, g, metric, exclude_self)
    _check_k(k, g.shape[0], exclude_self)
    device = q.device
    if metric == "cosine":
        q, g = normalize(q), normalize(g)
    qn = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
    gn = np.ascontiguousarray(g.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(gn.shape[1]) if metric == "l2" else faiss.IndexFlatIP(gn.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(gn)
    kk = k + int(exclude_self)
    values, indices = index.search(qn, kk)
    if exclude_self:
        values, indices = drop_self(values, indices, k)
    return (
        torch.from_numpy(np.ascontiguousarray(values)).to(device),
        torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(device),
    )


def drop_self(values: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From (Nq, k+1) neighbour lists, remove each query's own index (or the last entry when
    an exact duplicate pushed the query out of its own list, or an approximate index did not
    find it) -> (Nq, k)."""
    nq = indices.shape[0]
    drop = indices == np.arange(nq)[:, None]  # FAISS lists an index at most once per row
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return values[keep].reshape(nq, k), indices[keep].reshape(nq, k)

