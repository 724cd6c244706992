"""The torch count of the exact ranking engine (``fct.retrieval.engine``) by bucketing: for every
item of a (c, Ng) key block, how many of its row's positives lie strictly below it.

Keys are mapped to fine buckets by a monotone map; one table look-up gives the count of every
item whose bucket holds no positive, and only the few items sharing a bucket with a positive are
compared exactly. It is the GPU path and the CPU fallback of the compiled kernel
(``fct.retrieval.native``), which applies the same idea in one loop per row.
"""

from __future__ import annotations

import torch

# Items that share a bucket with a positive are resolved in slices of this many: by direct
# comparison when no bucket holds more than _MAX_LOCAL_COMPARES positives, else by binary search.
_AMBIGUOUS_SLICE = 1 << 22
_MAX_LOCAL_COMPARES = 8


def count_below_buckets(
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
    """Histogram bins by bucketing: out[i, n] = i * (P + 1) +
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
