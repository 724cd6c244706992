"""CMC top-k and full mAP for image retrieval, exact, in one chunked pass over the queries.

Conventions (protocols.md section 1):

* ``metric='l2'`` ranks by squared L2 distance on the raw features (the same order as L2);
  ``metric='cosine'`` L2-normalises both sides and ranks by inner product, largest first.
* Ties are broken *pessimistically*: a negative tied with a positive ranks ahead of it. For a
  query whose positives, sorted nearest first, are p_0 <= p_1 <= ..., positive k (0-based) has
  rank r_k = k + 1 + #{negatives at distance <= p_k}; AP = mean_k (k + 1) / r_k, and the query
  is a top-k hit iff #{negatives at distance <= p_0} < k.
* CMC top-k is a percentage over all queries (a query without any positive is a miss); mAP is
  the mean AP, as a percentage, over the queries that have at least one positive, and None
  (JSON null, never NaN) when no query has one; ``queries_with_positives`` says how many do.
* ``exclude_self`` (leave-one-out, Nq == Ng): query i never retrieves gallery item i.
* Ties are exact equalities of the float32 ranking keys as computed: for l2 the key is
  ||g||^2 - 2 q.g (the row constant ||q||^2 changes no order and is left out), for cosine
  minus the inner product of the unit vectors. TF32 is switched off for the pass.

How the fast path avoids sorting each (Ng,) row: for one chunk of queries it computes the
(chunk, Ng) block of ranking keys, sorts only each query's positive keys, and for every gallery
item counts the positives strictly nearer, j = #{positives < d}. A histogram of j over the row,
cumulated, gives #{items <= p_k}; minus the positives <= p_k, the negatives <= p_k. The count j
comes from a binary search (``searchsorted``, ~20 ns per pair on a CPU core) or, faster, from
bucketing: keys are mapped to fine buckets by a monotone map, one table look-up gives j for
every item whose bucket holds no positive, and the few percent of items sharing a bucket with a
positive get an exact binary search. Memory is O(chunk x Ng); no row is ever fully sorted.
On the CPU the same count runs as one compiled loop per row when a C compiler is at hand
(``fct.retrieval.native``, identical results, 2.5x faster); the torch ops are the fallback and
the GPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from fct.errors import UserError
from fct.retrieval.knn import (
    KNN_BACKENDS,
    as_float_tensor,
    auto_chunk,
    check_chunk,
    check_pair,
    full_precision_matmul,
    normalize,
)

# Bucket count for the bucketing count: up to this many per positive (fewer items share a
# bucket with a positive and need an exact search) ...
_BUCKETS_PER_POSITIVE = 64
# ... but at most this fraction of a gallery row (the per-row look-up table costs passes too).
_MAX_BUCKET_FRACTION = 0.5
# Below this many buckets per positive plain searchsorted is the faster count (few classes).
_MIN_BUCKETS_PER_POSITIVE = 4
# Tests set this to exercise one method: 0 = searchsorted, n > 0 = n buckets per row.
_FORCE_NUM_BUCKETS: int | None = None
# Items that share a bucket with a positive are resolved in slices of this many: by direct
# comparison when no bucket holds more than _MAX_LOCAL_COMPARES positives, else by binary search.
_AMBIGUOUS_SLICE = 1 << 22
_MAX_LOCAL_COMPARES = 8
# Bytes of per-chunk buffers per (query, gallery item) pair in the mAP pass: the key block
# (float32), the bucket value (float32), bucket index (int64), histogram bin (int32), a bool
# mask, and the bucket table (int32, at most _MAX_BUCKET_FRACTION of a row).
_BYTES_PER_PAIR = 4 + 4 + 8 + 4 + 1 + 4
# The compiled counting kernel (fct.retrieval.native) on CPU blocks: None = when it compiles,
# False = never (the torch path), True = always (an error when it cannot be built). Tests set it.
_USE_NATIVE: bool | None = None


def _as_labels(x: Any, n: int, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.shape[0] != n:
        raise UserError(f"{name} must be a 1-D array of {n} labels, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"{name} must hold integer class labels, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _check_topk(topk: Sequence[int]) -> tuple[int, ...]:
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
    ks = _check_topk(topk)
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


@dataclass(frozen=True)
class _Gallery:
    """The gallery reordered by label, so that each class is one contiguous column block."""

    keys_t: torch.Tensor  # (D, Ng): right-hand side of the key matmul
    sq_norms: torch.Tensor | None  # (1, Ng) for l2, None for cosine
    order: torch.Tensor  # (Ng,) original index of each reordered column
    class_labels: torch.Tensor  # (C,) sorted distinct labels
    class_start: torch.Tensor  # (C,) first column of each class
    class_count: torch.Tensor  # (C,)


def _prepare_gallery(g: torch.Tensor, labels: torch.Tensor, metric: str) -> _Gallery:
    order = torch.sort(labels, stable=True).indices
    g = g[order]
    class_labels, counts = torch.unique_consecutive(labels[order], return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    if metric == "cosine":
        # Smaller key = nearer for both metrics: negating the gallery costs nothing per pair.
        return _Gallery((-normalize(g)).t(), None, order, class_labels, start, counts)
    # ||q - g||^2 minus the row constant ||q||^2: the same order, one fewer pass per pair.
    return _Gallery(g.t(), (g * g).sum(1)[None, :], order, class_labels, start, counts)


def _keys(q: torch.Tensor, gal: _Gallery, out: torch.Tensor) -> torch.Tensor:
    """Ranking keys (c, Ng) into ``out``: smaller is nearer."""
    if gal.sq_norms is not None:
        return torch.addmm(gal.sq_norms, q, gal.keys_t, alpha=-2.0, out=out)
    return torch.mm(q, gal.keys_t, out=out)


def _count_below_buckets(
    nb: int,
    keys: torch.Tensor,
    pos: torch.Tensor,
    npos: torch.Tensor,
    out: torch.Tensor,
    work_f: torch.Tensor,
    work_i: torch.Tensor,
    work_b: torch.Tensor,
    table: torch.Tensor,
) -> None:
    """Histogram bins by bucketing (see the module docstring): out[i, n] = i * (P + 1) +
    #{positives of row i strictly below keys[i, n]} (what ``searchsorted`` would count).

    nb: buckets spanning the positives' range; keys (c, Ng); pos (c, P) sorted, +inf past
    each row's npos (c,) real positives; out (c, Ng) int32 (int64 for huge chunks); work_i
    (c, Ng) int64; work_f (c, Ng) float32; work_b (c, Ng) bool; table (c, >= nb + 7) scratch
    of out's dtype.
    Correct for any bucket map that is monotone non-decreasing and applied identically to
    items and positives: an item in a bucket below (above) a positive's bucket is below
    (above) that positive. Separate IEEE sub/mul/clamp/truncate ops are each monotone.
    """
    c, p = pos.shape
    dev = keys.device
    rows = torch.arange(c, device=dev)
    has = npos > 0
    lo = torch.where(has, pos[:, 0], 0.0)
    hi = torch.where(has, pos[rows, (npos - 1).clamp_min(0)], 0.0)
    # A width floor keeps the scale finite when all positives are tied (or there is one).
    width = torch.maximum((hi - lo) / nb, lo.abs() * 2.0**-20).clamp_min(1e-30)
    # Bucket 0 gathers everything well below p_0, bucket nb+4 everything well above the last
    # positive; the margin of two buckets keeps p_0 and p_last out of those catch-alls.
    origin = (lo - 2.0 * width)[:, None]
    scale = (1.0 / width)[:, None]
    top = float(nb + 4)

    def bucket(x: torch.Tensor, fbuf: torch.Tensor, ibuf: torch.Tensor) -> torch.Tensor:
        torch.sub(x, origin, out=fbuf)
        fbuf.mul_(scale).clamp_(0.0, top)
        return ibuf.copy_(fbuf)  # float -> int64 truncates: monotone as well

    pos_bucket = bucket(pos, torch.empty_like(pos), torch.empty_like(pos, dtype=torch.int64))
    # Padding entries go to a spare column that no item bucket (<= nb + 4) ever reads.
    real = torch.arange(p, device=dev)[None, :] < npos[:, None]
    pos_bucket.masked_fill_(~real, nb + 5)
    # table[b] = row offset + #{positives in buckets below b}: a histogram shifted by one,
    # with the row's first bin, i * (P + 1), in column 0, cumulated.
    table = table[:, : nb + 7].zero_()
    table.scatter_add_(1, pos_bucket + 1, torch.ones_like(pos_bucket, dtype=table.dtype))
    table[:, 0] = (rows * (p + 1)).to(table.dtype)
    table.cumsum_(1)
    # Where bucket b holds positives, store -1 - that bin instead: one look-up per item
    # then gives both the bin and "needs an exact comparison".
    below_b = table.gather(1, pos_bucket)
    table.scatter_(1, pos_bucket, -1 - below_b)

    item_bucket = bucket(keys, work_f, work_i)
    torch.gather(table, 1, item_bucket, out=out)
    torch.lt(out, 0, out=work_b)
    ambiguous = _flat_nonzero(work_b.view(-1))
    if ambiguous.numel() == 0:
        return
    ng = keys.shape[1]
    flat_keys, flat_out = keys.view(-1), out.view(-1)
    # The most positives that share one bucket (sorted rows: equal buckets are runs).
    run = torch.searchsorted(pos_bucket, pos_bucket, right=True)
    run -= torch.searchsorted(pos_bucket, pos_bucket)
    most = int(run.masked_fill_(~real, 0).max())
    if most <= _MAX_LOCAL_COMPARES:
        # An item in bucket b is above none of the positives of higher buckets: its count is
        # t_b (positives below b) plus how many of the next `most` sorted positives it beats.
        padded = torch.cat([pos, pos.new_full((c, most), float("inf"))], 1).view(-1)
        for sl in torch.split(ambiguous, _AMBIGUOUS_SLICE):
            r = sl // ng
            bin0 = -1 - flat_out.index_select(0, sl).to(torch.int64)  # r * (p + 1) + t_b
            at = bin0 + r * (most - 1)  # r * (p + most) + t_b
            key = flat_keys.index_select(0, sl)
            count = torch.zeros_like(bin0)
            for i in range(most):
                count += key > padded.index_select(0, at + i)
            flat_out.index_copy_(0, sl, (bin0 + count).to(out.dtype))
        return
    # Otherwise one binary search over all rows' positives at once, on int64 keys (row,
    # order-preserving bits of the float) that sort row-major.
    sorted_codes = _sortable_codes(pos, rows[:, None]).view(-1)
    for sl in torch.split(ambiguous, _AMBIGUOUS_SLICE):
        r = sl // ng
        found = torch.searchsorted(sorted_codes, _sortable_codes(flat_keys.index_select(0, sl), r))
        flat_out.index_copy_(0, sl, (found + r).to(out.dtype))  # r * (p + 1) + (found - r * p)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a contiguous 1-D bool mask, for sparse masks: scans
    it 8 bytes at a time and looks inside only the words that hold a True."""
    n = mask.numel()
    n8 = n - n % 8
    if n8 == 0 or mask.storage_offset() % 8:
        return mask.nonzero().squeeze(1)
    words = mask[:n8].view(torch.int64).nonzero().squeeze(1)
    sub = mask[:n8].view(-1, 8).index_select(0, words).nonzero()
    found = words.index_select(0, sub[:, 0]) * 8 + sub[:, 1]
    if n8 == n:
        return found
    return torch.cat([found, mask[n8:].nonzero().squeeze(1) + n8])


def _sortable_codes(x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """int64 codes ordered like (row, x): row in the high 32 bits, and in the low ones the
    float32 bits of x mapped so that integer order is float order (-0.0 and +0.0 equal)."""
    bits = (x + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse magnitude order
    return (row.to(torch.int64) << 32) + (bits.to(torch.int64) + 2**31)


def _num_buckets(p: int, ng: int) -> int:
    """Buckets per row for p positives in a row of ng items; 0 means use searchsorted."""
    if _FORCE_NUM_BUCKETS is not None:
        return _FORCE_NUM_BUCKETS
    nb = min(_BUCKETS_PER_POSITIVE * p, int(_MAX_BUCKET_FRACTION * ng))
    return nb if nb >= _MIN_BUCKETS_PER_POSITIVE * p else 0


@dataclass
class _ChunkStats:
    npos: torch.Tensor  # (c,) positives per query
    neg_before_first: torch.Tensor  # (c,) negatives at distance <= p_0
    ap: torch.Tensor | None  # (c,) float64 AP (0 where npos == 0)


@dataclass(frozen=True)
class _QueryBlocks:
    """Where each query's positives sit in the label-sorted gallery."""

    start: torch.Tensor  # (Nq,) first column of the query's class block
    count: torch.Tensor  # (Nq,) size of that block (0 for a label the gallery lacks)
    self_col: torch.Tensor | None  # (Nq,) column of the query's own item (leave-one-out)
    self_in_block: torch.Tensor | None  # (Nq,) bool: that column is one of the positives


def _query_blocks(q_labels: torch.Tensor, gal: _Gallery, exclude_self: bool) -> _QueryBlocks:
    ng = gal.order.shape[0]
    cls = torch.searchsorted(gal.class_labels, q_labels).clamp(max=gal.class_labels.shape[0] - 1)
    seen = gal.class_labels[cls] == q_labels
    start = gal.class_start[cls]
    count = torch.where(seen, gal.class_count[cls], 0)
    if not exclude_self:
        return _QueryBlocks(start, count, None, None)
    self_col = torch.empty_like(gal.order)
    self_col[gal.order] = torch.arange(ng, device=gal.order.device)
    self_col = self_col[: q_labels.shape[0]]
    # Query i's own item sits inside its class block only when its labels agree.
    in_block = seen & (self_col >= start) & (self_col < start + count)
    return _QueryBlocks(start, count, self_col, in_block)


def _native_counting(device: torch.device) -> bool:
    """Whether the mAP pass counts with the compiled kernel (CPU only; see fct.retrieval.native)."""
    if _USE_NATIVE is False or device.type != "cpu":
        return False
    from fct.retrieval import native

    if native.available():
        return True
    if _USE_NATIVE:
        raise RuntimeError("the compiled counting kernel could not be built (no C compiler?)")
    return False


class _Workspace:
    """Per-chunk buffers of the counting pass, allocated once: fresh multi-MB allocations
    cost page faults on every chunk. With the compiled kernel (``native``) the count needs
    no (chunk, Ng) buffers of its own."""

    def __init__(self, c: int, ng: int, compute_map: bool, device: torch.device, native: bool = False) -> None:
        self.compute_map = compute_map
        self.native = native
        if not (compute_map and native):
            self.work_f = torch.empty((c, ng), dtype=torch.float32, device=device)
        if compute_map and not native:
            self.mask = torch.empty((c, ng), dtype=torch.bool, device=device)
            # Histogram bins, row * (P + 1) + count, at most c * (Ng + 1): int32 halves the
            # traffic; int64 only for chunks beyond 2^31 pairs.
            self.bin_dtype = torch.int32 if c * (ng + 1) < 2**31 else torch.int64
            self.count = torch.empty((c, ng), dtype=self.bin_dtype, device=device)
            self.work_i = torch.empty((c, ng), dtype=torch.int64, device=device)
            self.table: torch.Tensor | None = None  # grown on demand
        self.c = c

    def table_for(self, nb: int) -> torch.Tensor:
        if self.table is None or self.table.shape[1] < nb + 7:
            dev = self.work_f.device
            self.table = torch.empty((self.c, nb + 7), dtype=self.bin_dtype, device=dev)
        return self.table


def _chunk_stats(
    keys: torch.Tensor, blocks: _QueryBlocks, s: int, ws: _Workspace
) -> _ChunkStats:
    """Statistics of queries s..s+n from their (n, Ng) ranking keys (label-sorted columns;
    a query's own item, under leave-one-out, already set to +inf). ``keys`` is not modified."""
    n, ng = keys.shape
    dev = keys.device
    e = s + n
    cnt = blocks.count[s:e]
    p = max(int(cnt.max()), 1)
    offs = torch.arange(p, device=dev)[None, :]
    in_block = offs < cnt[:, None]
    cols = (blocks.start[s:e, None] + offs).clamp(max=ng - 1)
    pos = keys.gather(1, cols).masked_fill_(~in_block, float("inf"))
    pos = torch.sort(pos, dim=1).values  # the excluded self (+inf) sorts last
    npos = cnt if blocks.self_in_block is None else cnt - blocks.self_in_block[s:e].to(cnt.dtype)
    pos_le = torch.searchsorted(pos, pos, right=True)  # (n, p): positives <= p_k

    if not ws.compute_map:
        # A 0/1 float mask sums ~10x faster than a bool one (exact below 2^24 items).
        le_first = torch.le(keys, pos[:, :1], out=ws.work_f[:n]).sum(1).to(torch.int64)
        return _ChunkStats(npos, le_first - pos_le[:, 0], None)

    if ws.native:
        from fct.retrieval import native

        # The kernel scans the positives that share an item's bucket, so any count works: a
        # forced one (tests), else as many as the torch path would use, at least one.
        nb = _FORCE_NUM_BUCKETS or max(1, min(_BUCKETS_PER_POSITIVE * p, int(_MAX_BUCKET_FRACTION * ng)))
        hist = native.count_below_histogram(keys, pos, npos, nb)
        return _ap_from_histogram(hist, pos_le, npos, offs, p)
    nb = _num_buckets(p, ng)
    below = ws.count[:n]
    if nb > 0:
        _count_below_buckets(
            nb, keys, pos, npos, below, ws.work_f[:n], ws.work_i[:n], ws.mask[:n], ws.table_for(nb)[:n]
        )
    else:
        torch.searchsorted(pos, keys, out_int32=below.dtype == torch.int32, out=below)
        below.add_(torch.arange(0, n * (p + 1), p + 1, device=dev, dtype=below.dtype)[:, None])
    # below holds histogram bins row * (p + 1) + j: one flat bincount counts them all.
    hist = torch.bincount(below.view(-1), minlength=n * (p + 1)).view(n, p + 1)
    return _ap_from_histogram(hist, pos_le, npos, offs, p)


def _ap_from_histogram(hist: torch.Tensor, pos_le: torch.Tensor, npos: torch.Tensor, offs: torch.Tensor,
                       p: int) -> _ChunkStats:
    """AP per row from the (n, p + 1) histogram of "positives strictly below the item"."""
    # items <= p_k, minus positives <= p_k: negatives ranked ahead of positive k.
    neg_le = torch.cumsum(hist, 1)[:, :p] - pos_le
    k1 = (offs + 1).to(torch.float64)
    prec = k1 / (k1 + neg_le.to(torch.float64))
    valid = offs < npos[:, None]
    ap = (prec * valid).sum(1) / npos.clamp_min(1).to(torch.float64)
    return _ChunkStats(npos, neg_le[:, 0], ap)


def _chunk_starts(nq: int, c: int, progress: bool, desc: str = "retrieval") -> Iterable[int]:
    starts: Iterable[int] = range(0, nq, c)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", total=len(range(0, nq, c)))
    return starts


def _rank_pass(
    q: torch.Tensor,
    q_labels: torch.Tensor,
    gal: _Gallery,
    exclude_self: bool,
    compute_map: bool,
    chunk_size: int | None,
    progress: bool,
) -> Iterator[_ChunkStats]:
    """One pass over query chunks; yields per-chunk positive counts, first-positive
    negatives count (for CMC) and AP (for mAP)."""
    nq, dev = q.shape[0], q.device
    ng = gal.order.shape[0]
    per_pair = _BYTES_PER_PAIR if compute_map else 4 + 4
    c = min(chunk_size or auto_chunk(nq, ng, per_pair, dev), nq)
    key_buf = torch.empty((c, ng), dtype=torch.float32, device=dev)
    ws = _Workspace(c, ng, compute_map, dev, native=compute_map and _native_counting(dev))
    blocks = _query_blocks(q_labels, gal, exclude_self)
    for s in _chunk_starts(nq, c, progress):
        e = min(s + c, nq)
        keys = _keys(q[s:e], gal, key_buf[: e - s])
        if blocks.self_col is not None:
            keys[torch.arange(e - s, device=dev), blocks.self_col[s:e]] = float("inf")
        yield _chunk_stats(keys, blocks, s, ws)


def _prepare_inputs(
    query: Any, query_labels: Any, gallery: Any, gallery_labels: Any, metric: str,
    exclude_self: bool, chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q = as_float_tensor(query, "query")
    g = as_float_tensor(gallery, "gallery")
    check_pair(q, g, metric, exclude_self)
    ql = _as_labels(query_labels, q.shape[0], "query_labels", q.device)
    gl = _as_labels(gallery_labels, g.shape[0], "gallery_labels", q.device)
    check_chunk(chunk_size)
    return q, ql, g, gl


def queries_with_positives(q_labels: torch.Tensor, g_labels: torch.Tensor, exclude_self: bool) -> int:
    """How many queries have at least one positive in the gallery (their own item not counted
    under leave-one-out): the queries mAP is averaged over."""
    classes, counts = torch.unique(g_labels, return_counts=True)
    idx = torch.searchsorted(classes, q_labels).clamp(max=classes.shape[0] - 1)
    npos = torch.where(classes[idx] == q_labels, counts[idx], 0)
    if exclude_self:
        npos = npos - (g_labels[: q_labels.shape[0]] == q_labels).to(npos.dtype)
    return int((npos > 0).sum())


def _per_query(
    q: torch.Tensor, ql: torch.Tensor, g: torch.Tensor, gl: torch.Tensor, metric: str,
    exclude_self: bool, compute_map: bool, chunk_size: int | None, progress: bool,
) -> dict[str, torch.Tensor]:
    gal = _prepare_gallery(g, gl, metric)
    qn = normalize(q) if metric == "cosine" else q
    with full_precision_matmul():
        stats = list(_rank_pass(qn, ql, gal, exclude_self, compute_map, chunk_size, progress))
    npos = torch.cat([st.npos for st in stats])
    has = npos > 0
    first = torch.cat([st.neg_before_first for st in stats]) + 1
    out = {"num_positives": npos, "first_positive_rank": torch.where(has, first, 0)}
    if compute_map:
        ap = torch.cat([st.ap for st in stats if st.ap is not None])
        out["ap"] = torch.where(has, ap, float("nan"))
    return out


def retrieval_per_query(
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
) -> dict[str, torch.Tensor]:
    """Per-query results of the exact pass (pessimistic ties), on the features' device.

    Returns ``{'num_positives': (Nq,) int64, 'first_positive_rank': (Nq,) int64 1-based
    rank of the nearest positive (0 when the query has none), 'ap': (Nq,) float64 AP in
    [0, 1] (nan when the query has no positive; absent when compute_map is False)}``.
    A query is a top-k hit iff 1 <= first_positive_rank <= k (e.g. per-sample flips).
    """
    q, ql, g, gl = _prepare_inputs(
        query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size
    )
    return _per_query(q, ql, g, gl, metric, exclude_self, compute_map, chunk_size, progress)


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
) -> dict[str, float | int | None]:
    """CMC top-k and full mAP (percentages) of a query set against a gallery.

    query (Nq, D), query_labels (Nq,), gallery (Ng, D), gallery_labels (Ng,): tensors (on any
    one device) or numpy arrays; features are used as float32, labels as int64.
    Returns ``{'top1': .., 'top5': .. (one per k in topk), 'mAP': .. or None when
    compute_map is False or no query has a positive (mAP undefined), 'num_queries': Nq,
    'queries_with_positives': queries with at least one positive, 'num_map_queries': the
    same count, None without mAP}``. No value is ever NaN (results go to strict JSON).

    knn_backend 'torch' does everything in one exact chunked pass with pessimistic ties
    (module docstring); 'faiss' takes CMC from FAISS neighbour lists (its own tie order) and
    mAP from the torch pass. Memory is O(chunk x Ng); ``chunk_size`` (query rows) defaults to
    a memory budget.
    """
    q, ql, g, gl = _prepare_inputs(
        query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size
    )
    ks = _check_topk(topk)
    knn_fn = KNN_BACKENDS.get(knn_backend)
    nq = q.shape[0]
    result: dict[str, float | int | None] = {}
    per_q: dict[str, torch.Tensor] = {}
    if compute_map or knn_backend == "torch":
        per_q = _per_query(q, ql, g, gl, metric, exclude_self, compute_map, chunk_size, progress)
    if knn_backend == "torch":
        rank = per_q["first_positive_rank"]
        for k in ks:
            result[f"top{k}"] = 100.0 * int(((rank >= 1) & (rank <= k)).sum()) / nq
    else:
        # Beyond the gallery's size a longer list cannot change a hit: cap k there.
        k_max = min(max(ks), g.shape[0] - int(exclude_self))
        _, idx = knn_fn(q, g, k_max, metric=metric, exclude_self=exclude_self, chunk_size=chunk_size)
        cmc = cmc_from_neighbors(gl[idx.to(gl.device)], ql, sorted({min(k, k_max) for k in ks}))
        for k in ks:
            result[f"top{k}"] = cmc[f"top{min(k, k_max)}"]
    result["mAP"] = None
    result["num_map_queries"] = None
    if per_q:
        n_pos = int((per_q["num_positives"] > 0).sum())
    else:
        n_pos = queries_with_positives(ql, gl, exclude_self)
    if compute_map:
        has = per_q["num_positives"] > 0
        result["mAP"] = 100.0 * float(per_q["ap"][has].sum()) / n_pos if n_pos else None
        result["num_map_queries"] = n_pos
    result["num_queries"] = nq
    result["queries_with_positives"] = n_pos
    return result
