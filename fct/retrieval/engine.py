"""The exact ranking engine of retrieval evaluation: one chunked pass over the queries that
gives, for every query, its number of positives, the rank of its nearest positive and its AP
(:class:`QueryRanks`). Every retrieval metric is computed from these (``fct.retrieval.metrics``).

Conventions (protocols.md section 1):

* ``metric='l2'`` ranks by squared L2 distance on the raw features (the same order as L2);
  ``metric='cosine'`` L2-normalises both sides and ranks by inner product, largest first.
* Ties are broken *pessimistically*: a negative tied with a positive ranks ahead of it. For a
  query whose positives, sorted nearest first, are p_0 <= p_1 <= ..., positive k (0-based) has
  rank r_k = k + 1 + #{negatives at distance <= p_k}; AP = mean_k (k + 1) / r_k, and the
  nearest positive has rank r_0.
* ``exclude_self`` (leave-one-out, Nq == Ng): query i never retrieves gallery item i.
* Ties are exact equalities of the float32 ranking keys as computed: for l2 the key is
  ||g||^2 - 2 q.g (the row constant ||q||^2 changes no order and is left out), for cosine
  minus the inner product of the unit vectors. TF32 is switched off for the pass.

How the pass avoids sorting each (Ng,) row: for one chunk of queries it computes the (chunk, Ng)
block of ranking keys, sorts only each query's positive keys, and for every gallery item counts
the positives strictly nearer, j = #{positives < d}. A histogram of j over the row, cumulated,
gives #{items <= p_k}; minus the positives <= p_k, the negatives <= p_k. The count j comes from
one of three places, all exact and identical: on the CPU a compiled loop per row when a C
compiler is at hand (``fct.retrieval.native``: one pass over the block); else bucketing in torch
ops (``fct.retrieval.bucket_count``: a table look-up per item, exact comparisons only near a
positive), the GPU path; or, with few buckets per positive (few classes), a plain binary search
(``searchsorted``), where the bucket table would not pay for itself. Memory is O(chunk x Ng); no
row is ever fully sorted. Without mAP only the nearest positive matters, and one comparison per
item against p_0 counts the negatives ahead of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch

from fct.errors import UserError
from fct.retrieval import native
from fct.retrieval.bucket_count import count_below_buckets
from fct.retrieval.knn import as_float_tensor, auto_chunk, check_chunk, check_pair, full_precision_matmul, normalize

# Bucket count for the bucketing count: up to this many per positive (fewer items share a
# bucket with a positive and need an exact search) ...
_BUCKETS_PER_POSITIVE = 64
# ... but at most this fraction of a gallery row (the per-row look-up table costs passes too).
_MAX_BUCKET_FRACTION = 0.5
# Below this many buckets per positive plain searchsorted is the faster count (few classes).
_MIN_BUCKETS_PER_POSITIVE = 4
# Tests set this to exercise one method: 0 = searchsorted, n > 0 = n buckets per row.
_FORCE_NUM_BUCKETS: int | None = None
# Bytes of per-chunk buffers per (query, gallery item) pair. With mAP: the key block (float32),
# the bucket value (float32), bucket index (int64), histogram bin (int32), a bool mask, and the
# bucket table (int32, at most _MAX_BUCKET_FRACTION of a row). Without: the key block and a
# float32 0/1 mask.
_BYTES_PER_PAIR_MAP = 4 + 4 + 8 + 4 + 1 + 4
_BYTES_PER_PAIR_CMC = 4 + 4
# The compiled counting kernel (fct.retrieval.native) on CPU blocks: None = when it compiles,
# False = never (the torch path), True = always (an error when it cannot be built). Tests set it.
_USE_NATIVE: bool | None = None


def as_labels(x: Any, n: int, name: str, device: torch.device) -> torch.Tensor:
    """(n,) int64 class labels on ``device`` from a tensor or an array; UserError otherwise."""
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.shape[0] != n:
        raise UserError(f"{name} must be a 1-D array of {n} labels, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"{name} must hold integer class labels, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def check_inputs(
    query: Any, query_labels: Any, gallery: Any, gallery_labels: Any, metric: str,
    exclude_self: bool, chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features as float32 (Nq, D) / (Ng, D) and labels as int64, all on the query's device;
    one clear UserError for anything the engine cannot rank."""
    q = as_float_tensor(query, "query")
    g = as_float_tensor(gallery, "gallery")
    check_pair(q, g, metric, exclude_self)
    ql = as_labels(query_labels, q.shape[0], "query_labels", q.device)
    gl = as_labels(gallery_labels, g.shape[0], "gallery_labels", q.device)
    check_chunk(chunk_size)
    return q, ql, g, gl


@dataclass(frozen=True)
class Gallery:
    """The gallery reordered by label, so that each class is one contiguous column block."""

    keys_t: torch.Tensor  # (D, Ng): right-hand side of the key matmul
    sq_norms: torch.Tensor | None  # (1, Ng) for l2, None for cosine
    order: torch.Tensor  # (Ng,) original index of each reordered column
    class_labels: torch.Tensor  # (C,) sorted distinct labels
    class_start: torch.Tensor  # (C,) first column of each class
    class_count: torch.Tensor  # (C,)


def prepare_gallery(g: torch.Tensor, labels: torch.Tensor, metric: str) -> Gallery:
    """``g`` (Ng, D) and its labels (Ng,) as a label-sorted :class:`Gallery` for ``metric``."""
    order = torch.sort(labels, stable=True).indices
    g = g[order]
    class_labels, counts = torch.unique_consecutive(labels[order], return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    if metric == "cosine":
        # Smaller key = nearer for both metrics: negating the gallery costs nothing per pair.
        return Gallery((-normalize(g)).t(), None, order, class_labels, start, counts)
    # ||q - g||^2 minus the row constant ||q||^2: the same order, one fewer pass per pair.
    return Gallery(g.t(), (g * g).sum(1)[None, :], order, class_labels, start, counts)


def ranking_keys(q: torch.Tensor, gal: Gallery, out: torch.Tensor) -> torch.Tensor:
    """Ranking keys (c, Ng) of queries q (c, D) (unit rows for cosine) into ``out``: smaller is nearer."""
    if gal.sq_norms is not None:
        return torch.addmm(gal.sq_norms, q, gal.keys_t, alpha=-2.0, out=out)
    return torch.mm(q, gal.keys_t, out=out)


@dataclass(frozen=True)
class QueryBlocks:
    """Where each query's positives sit in the label-sorted gallery."""

    start: torch.Tensor  # (Nq,) first column of the query's class block
    count: torch.Tensor  # (Nq,) size of that block (0 for a label the gallery lacks)
    num_positives: torch.Tensor  # (Nq,) count, less the query's own item under leave-one-out
    self_col: torch.Tensor | None  # (Nq,) column of the query's own item (leave-one-out)

    def hide_self(self, keys: torch.Tensor, s: int) -> None:
        """Leave-one-out: set the own-item column of each row of the key block of queries
        s.. to +inf, so it ranks last and counts as no item (a no-op otherwise)."""
        if self.self_col is not None:
            n = keys.shape[0]
            keys[torch.arange(n, device=keys.device), self.self_col[s:s + n]] = float("inf")


def query_blocks(q_labels: torch.Tensor, gal: Gallery, exclude_self: bool) -> QueryBlocks:
    """The :class:`QueryBlocks` of queries labelled ``q_labels`` (Nq,) against ``gal``."""
    ng = gal.order.shape[0]
    cls = torch.searchsorted(gal.class_labels, q_labels).clamp(max=gal.class_labels.shape[0] - 1)
    seen = gal.class_labels[cls] == q_labels
    start = gal.class_start[cls]
    count = torch.where(seen, gal.class_count[cls], 0)
    if not exclude_self:
        return QueryBlocks(start, count, count, None)
    self_col = torch.empty_like(gal.order)
    self_col[gal.order] = torch.arange(ng, device=gal.order.device)
    self_col = self_col[: q_labels.shape[0]]
    # Query i's own item sits inside its class block only when its labels agree.
    in_block = seen & (self_col >= start) & (self_col < start + count)
    return QueryBlocks(start, count, count - in_block.to(count.dtype), self_col)


def queries_with_positives(q_labels: torch.Tensor, g_labels: torch.Tensor, exclude_self: bool) -> int:
    """How many queries have at least one positive in the gallery (their own item not counted
    under leave-one-out), from the labels alone: the queries mAP is averaged over."""
    classes, counts = torch.unique(g_labels, return_counts=True)
    idx = torch.searchsorted(classes, q_labels).clamp(max=classes.shape[0] - 1)
    npos = torch.where(classes[idx] == q_labels, counts[idx], 0)
    if exclude_self:
        npos = npos - (g_labels[: q_labels.shape[0]] == q_labels).to(npos.dtype)
    return int((npos > 0).sum())


# --------------------------------------------------------------------------- counting


def _num_buckets(p: int, ng: int) -> int:
    """Buckets per row for p positives in a row of ng items; 0 means use searchsorted."""
    if _FORCE_NUM_BUCKETS is not None:
        return _FORCE_NUM_BUCKETS
    nb = min(_BUCKETS_PER_POSITIVE * p, int(_MAX_BUCKET_FRACTION * ng))
    return nb if nb >= _MIN_BUCKETS_PER_POSITIVE * p else 0


def _native_counting(device: torch.device) -> bool:
    """Whether the mAP count uses the compiled kernel (CPU only; see fct.retrieval.native)."""
    if _USE_NATIVE is False or device.type != "cpu":
        return False
    if native.available():
        return True
    if _USE_NATIVE:
        raise RuntimeError("the compiled counting kernel could not be built (no C compiler?)")
    return False


@dataclass
class ChunkStats:
    """What one key block says about its queries."""

    npos: torch.Tensor  # (c,) positives per query
    neg_before_first: torch.Tensor  # (c,) negatives at distance <= p_0
    ap: torch.Tensor | None  # (c,) float64 AP (0 where npos == 0); None without mAP


class Counter:
    """Counts, in key blocks of up to ``rows`` queries by Ng label-sorted columns, the negatives
    ranked ahead of each query's positives (:meth:`count`). It holds the per-chunk buffers,
    allocated once: fresh multi-MB allocations cost page faults on every chunk. With the compiled
    kernel the count needs no (rows, Ng) buffers of its own."""

    def __init__(self, rows: int, ng: int, compute_map: bool, device: torch.device) -> None:
        self.rows = rows
        self.compute_map = compute_map
        self.native = compute_map and _native_counting(device)
        if not (compute_map and self.native):
            self.work_f = torch.empty((rows, ng), dtype=torch.float32, device=device)
        if compute_map and not self.native:
            self.mask = torch.empty((rows, ng), dtype=torch.bool, device=device)
            # Histogram bins, row * (P + 1) + count, at most rows * (Ng + 1): int32 halves the
            # traffic; int64 only for chunks beyond 2^31 pairs.
            self.bin_dtype = torch.int32 if rows * (ng + 1) < 2**31 else torch.int64
            self.bins = torch.empty((rows, ng), dtype=self.bin_dtype, device=device)
            self.work_i = torch.empty((rows, ng), dtype=torch.int64, device=device)
            self.table: torch.Tensor | None = None  # grown on demand

    def _table_for(self, nb: int) -> torch.Tensor:
        if self.table is None or self.table.shape[1] < nb + 7:
            self.table = torch.empty((self.rows, nb + 7), dtype=self.bin_dtype, device=self.work_f.device)
        return self.table

    def count(self, keys: torch.Tensor, blocks: QueryBlocks, s: int) -> ChunkStats:
        """Statistics of queries s..s+n from their (n, Ng) ranking keys (label-sorted columns;
        a query's own item, under leave-one-out, already +inf). ``keys`` is not modified."""
        n, ng = keys.shape
        dev = keys.device
        e = s + n
        cnt = blocks.count[s:e]
        p = max(int(cnt.max()), 1)
        offs = torch.arange(p, device=dev)[None, :]
        in_block = offs < cnt[:, None]
        cols = (blocks.start[s:e, None] + offs).clamp(max=ng - 1)
        pos = keys.gather(1, cols).masked_fill_(~in_block, float("inf"))
        pos = _sorted_rows(pos)  # the excluded self (+inf) sorts last
        npos = blocks.num_positives[s:e]
        pos_le = torch.searchsorted(pos, pos, right=True)  # (n, p): positives <= p_k

        if not self.compute_map:
            # Summing a float32 0/1 mask takes the vectorised float reduction, which a bool
            # mask does not (exact below 2^24 items per row).
            le_first = torch.le(keys, pos[:, :1], out=self.work_f[:n]).sum(1).to(torch.int64)
            return ChunkStats(npos, le_first - pos_le[:, 0], None)

        if self.native:
            # The kernel scans the positives that share an item's bucket, so any count works: a
            # forced one (tests), else as many as the torch path would use, at least one.
            nb = _FORCE_NUM_BUCKETS or max(1, min(_BUCKETS_PER_POSITIVE * p, int(_MAX_BUCKET_FRACTION * ng)))
            hist = native.count_below_histogram(keys, pos, npos, nb)
            return _ap_from_histogram(hist, pos_le, npos, offs, p)
        nb = _num_buckets(p, ng)
        below = self.bins[:n]
        if nb > 0:
            count_below_buckets(nb, keys, pos, npos, below, self.work_f[:n], self.work_i[:n], self.mask[:n],
                                self._table_for(nb)[:n])
        else:
            torch.searchsorted(pos, keys, out_int32=below.dtype == torch.int32, out=below)
            below.add_(torch.arange(0, n * (p + 1), p + 1, device=dev, dtype=below.dtype)[:, None])
        # below holds histogram bins row * (p + 1) + j: one flat bincount counts them all.
        hist = torch.bincount(below.view(-1), minlength=n * (p + 1)).view(n, p + 1)
        return _ap_from_histogram(hist, pos_le, npos, offs, p)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, p) float32 with each row sorted ascending (NaN last). On the CPU numpy's sort
    (vectorised) is about 25x faster than torch.sort on (1342, 500) rows of positives."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _ap_from_histogram(hist: torch.Tensor, pos_le: torch.Tensor, npos: torch.Tensor, offs: torch.Tensor,
                       p: int) -> ChunkStats:
    """AP per row from the (n, p + 1) histogram of "positives strictly below the item"."""
    # items <= p_k, minus positives <= p_k: negatives ranked ahead of positive k.
    neg_le = torch.cumsum(hist, 1)[:, :p] - pos_le
    k1 = (offs + 1).to(torch.float64)
    prec = k1 / (k1 + neg_le.to(torch.float64))
    valid = offs < npos[:, None]
    ap = (prec * valid).sum(1) / npos.clamp_min(1).to(torch.float64)
    return ChunkStats(npos, neg_le[:, 0], ap)


def chunk_rows(nq: int, ng: int, compute_map: bool, device: torch.device, chunk_size: int | None,
               extra_bytes_per_pair: int = 0) -> int:
    """Query rows per key block: ``chunk_size``, else as many as the memory budget of
    ``auto_chunk`` allows for the counting buffers plus ``extra_bytes_per_pair`` of the caller's.
    The compiled count needs no per-pair buffer besides the key block: its blocks are about 6x
    taller, which at 50,000 x 50,000 makes the pass about 1.3x faster (fewer, larger matmuls)."""
    if compute_map and _native_counting(device):
        per_pair = _BYTES_PER_PAIR_CMC // 2 + extra_bytes_per_pair  # the float32 key block
    else:
        per_pair = (_BYTES_PER_PAIR_MAP if compute_map else _BYTES_PER_PAIR_CMC) + extra_bytes_per_pair
    return min(chunk_size or auto_chunk(nq, ng, per_pair, device), nq)


def chunk_starts(nq: int, c: int, progress: bool, desc: str = "retrieval") -> Iterable[int]:
    """First query of each block of ``c``, with a progress bar when asked."""
    starts: Iterable[int] = range(0, nq, c)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", total=len(range(0, nq, c)))
    return starts


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class QueryRanks:
    """Per-query results of the exact pass (pessimistic ties), on the features' device.
    A query is a top-k hit iff 1 <= first_positive_rank <= k."""

    num_positives: torch.Tensor  # (Nq,) int64 positives in the gallery (own item excluded under leave-one-out)
    first_positive_rank: torch.Tensor  # (Nq,) int64 1-based rank of the nearest positive, 0 without one
    ap: Optional[torch.Tensor]  # (Nq,) float64 AP in [0, 1], nan without a positive; None when not computed

    def queries_with_positives(self) -> int:
        """How many queries have a positive: the queries mAP is averaged over."""
        return int((self.num_positives > 0).sum())


def rank_queries(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    metric: str = "l2",
    exclude_self: bool = False,
    compute_map: bool = True,
    chunk_size: int | None = None,
    progress: bool = False,
) -> QueryRanks:
    """The exact pass: :class:`QueryRanks` of query (Nq, D) / query_labels (Nq,) against
    gallery (Ng, D) / gallery_labels (Ng,) (tensors on one device, or arrays). AP only when
    ``compute_map`` (it needs the full count of every row, CMC only the nearest positive).
    Memory is O(chunk x Ng); ``chunk_size`` (query rows) defaults to a memory budget."""
    q, ql, g, gl = check_inputs(query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size)
    gal = prepare_gallery(g, gl, metric)
    qn = normalize(q) if metric == "cosine" else q
    nq, ng, dev = q.shape[0], g.shape[0], q.device
    stats: list[ChunkStats] = []
    with full_precision_matmul():
        c = chunk_rows(nq, ng, compute_map, dev, chunk_size)
        key_buf = torch.empty((c, ng), dtype=torch.float32, device=dev)
        counter = Counter(c, ng, compute_map, dev)
        blocks = query_blocks(ql, gal, exclude_self)
        for s in chunk_starts(nq, c, progress):
            keys = ranking_keys(qn[s:s + c], gal, key_buf[: min(c, nq - s)])
            blocks.hide_self(keys, s)
            stats.append(counter.count(keys, blocks, s))
    npos = torch.cat([st.npos for st in stats])
    has = npos > 0
    first = torch.cat([st.neg_before_first for st in stats]) + 1
    ap = None
    if compute_map:
        ap = torch.where(has, torch.cat([st.ap for st in stats if st.ap is not None]), float("nan"))
    return QueryRanks(npos, torch.where(has, first, 0), ap)
