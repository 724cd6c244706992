"""Backfilling curves (FastFill, protocols.md section 2), exact and in one pass over the queries.

After a model update the gallery holds transformed old features h(old); backfilling replaces
them item by item with new-model features, in the order given by a permutation pi of the
gallery. With ``B`` intermediate steps the curve has B + 2 points: at point i the first
``i * N // (B + 1)`` items of pi hold new features and the rest h(old) (the reference's cut-off),
so point 0 is new/h(old) and point B + 1 is new/new. Queries are always new-model features.

How it is computed: for each chunk of queries the ranking keys against the new gallery and
against the h(old) gallery are computed once (two matmuls); a third buffer starts as the h(old)
keys and, point after point, takes the new keys of the columns backfilled since the previous
point (``index_copy_``), so every point of every ordering costs one counting pass over the
chunk (the exact counts of :mod:`fct.retrieval.engine`, pessimistic ties) and no
matmul. Memory is O(chunk x Ng).

Orderings live in the ``BACKFILL_ORDERS`` registry: a function ``(BackfillInputs) -> list of
permutations`` (several for ``random``, one per seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from fct.errors import UserError
from fct.registry import Registry
from fct.retrieval.engine import (
    Counter,
    as_labels,
    chunk_rows,
    chunk_starts,
    prepare_gallery,
    query_blocks,
    ranking_keys,
)
from fct.retrieval.knn import as_float_tensor, check_chunk, full_precision_matmul, normalize
from fct.retrieval.metrics import check_topk

@dataclass(frozen=True)
class BackfillInputs:
    """What an ordering may look at (all on the CPU; N gallery items)."""

    new: torch.Tensor  # (N, D) new-model features of the gallery
    old: torch.Tensor  # (N, D) h(old) features of the gallery
    uncertainty: Optional[torch.Tensor]  # (N,) larger = more uncertain, or None
    metric: str  # 'l2' | 'cosine'
    seed: int
    random_seeds: int  # permutations of the random ordering
    gallery_source: str = ""  # for messages


OrderFn = Callable[[BackfillInputs], list[torch.Tensor]]
BACKFILL_ORDERS: Registry = Registry("backfilling order")


def _descending(score: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score; equal scores keep index order (stable)."""
    return torch.sort(score.double(), descending=True, stable=True).indices


@BACKFILL_ORDERS.register("random")
def random_order(inp: BackfillInputs) -> list[torch.Tensor]:
    """Uniformly random permutations, one per seed ``seed, seed + 1, ...``."""
    n = inp.new.shape[0]
    gens = (torch.Generator().manual_seed(inp.seed + r) for r in range(inp.random_seeds))
    return [torch.randperm(n, generator=g) for g in gens]


@BACKFILL_ORDERS.register("sigma")
def sigma_order(inp: BackfillInputs) -> list[torch.Tensor]:
    """FastFill: the most uncertain items (largest predicted log-variance) first."""
    if inp.uncertainty is None:
        raise UserError(
            "backfilling order 'sigma' needs a gallery that predicts its uncertainty (a FastFill "
            f"transformation such as MLP_BN_SIDE_PROJECTION_SIGMA), but {inp.gallery_source or 'the gallery'} "
            "has none; use backfilling_list: [random, distance] for it"
        )
    return [_descending(inp.uncertainty)]


@BACKFILL_ORDERS.register("distance")
def distance_order(inp: BackfillInputs) -> list[torch.Tensor]:
    """Oracle: the items whose h(old) feature is farthest from their new feature first (L2 on
    the features as compared: unit vectors for the cosine metric). Needs the new features of the
    whole gallery, so it is an upper reference, not a deployable order."""
    new, old = (normalize(inp.new), normalize(inp.old)) if inp.metric == "cosine" else (inp.new, inp.old)
    return [_descending((new.double() - old.double()).norm(dim=1))]


def check_orderings(names: Sequence[str]) -> None:
    """Fail at once, listing the valid names, on an unknown or repeated ordering."""
    for name in names:
        BACKFILL_ORDERS.get(name)
    if len(set(names)) != len(names):
        raise UserError(f"eval_params.backfilling_list repeats an ordering: {list(names)}")


def curve_points(n: int, steps: int) -> list[int]:
    """Backfilled item counts of the ``steps + 2`` points: i * n // (steps + 1)."""
    return [i * n // (steps + 1) for i in range(steps + 2)]


@dataclass
class BackfillCurve:
    """One ordering's curves. ``values[metric]`` is (runs, points) in percent (one run per
    permutation: several for ``random``)."""

    name: str
    fractions: list[float]  # backfilled fraction of the gallery at each point
    values: dict[str, np.ndarray] = field(default_factory=dict)
    # queries with at least one positive: mAP is averaged over them (NaN points when 0)
    queries_with_positives: Optional[int] = None

    def mean(self, metric: str) -> np.ndarray:
        return self.values[metric].mean(axis=0)

    def auc(self, metric: str, rule: str = "mean") -> np.ndarray:
        """(runs,) area under each run's curve: the mean of the points (the published
        convention) or the trapezoid rule over the backfilled fraction."""
        v = self.values[metric]
        if rule == "mean":
            return v.mean(axis=1)
        x = np.asarray(self.fractions)
        return ((v[:, 1:] + v[:, :-1]) * np.diff(x)[None, :] / 2.0).sum(axis=1)

    def to_dict(self) -> dict[str, Any]:
        """Every point and AUC; for several runs also each run, the spread (sample std) and the
        min/max, so a random curve's noise is visible. Strict-JSON ready: an undefined value
        (mAP when no query has a positive) is None, with ``queries_with_positives`` saying why."""
        out: dict[str, Any] = {"fractions": self.fractions, "runs": int(next(iter(self.values.values())).shape[0])}
        if self.queries_with_positives is not None:
            out["queries_with_positives"] = self.queries_with_positives
        for m, v in self.values.items():
            entry: dict[str, Any] = {"points": _json_list(self.mean(m))}
            for rule in ("mean", "trapezoid"):
                a = self.auc(m, rule)
                entry[f"auc_{rule}"] = _json_float(a.mean())
                if v.shape[0] > 1:
                    entry[f"auc_{rule}_std"] = _json_float(a.std(ddof=1))
                    entry[f"auc_{rule}_runs"] = _json_list(a)
            if v.shape[0] > 1:
                entry["points_std"] = _json_list(v.std(axis=0, ddof=1))
                entry["points_min"] = _json_list(v.min(axis=0))
                entry["points_max"] = _json_list(v.max(axis=0))
            if not np.isfinite(v).all():
                entry["note"] = "undefined (null): no query has a positive in the gallery"
            out[m] = entry
        return out


def _json_float(x: Any) -> Optional[float]:
    """A finite float, or None for NaN / infinity (strict JSON has neither)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _json_list(a: np.ndarray) -> list[Optional[float]]:
    return [_json_float(x) for x in np.asarray(a).ravel()]


def backfilling_curves(
    query: Any,
    query_labels: Any,
    gallery_new: Any,
    gallery_old: Any,
    gallery_labels: Any,
    orders: dict[str, list[torch.Tensor]],
    *,
    steps: int,
    metric: str = "l2",
    exclude_self: bool = False,
    topk: Sequence[int] = (1, 5),
    compute_map: bool = True,
    chunk_size: Optional[int] = None,
    progress: bool = False,
) -> dict[str, BackfillCurve]:
    """Curves of CMC top-k (and mAP) for each ordering.

    query (Nq, D) new-model query features; gallery_new / gallery_old (N, D) the gallery under
    the new model and under h(old), same items and labels (gallery_labels (N,)); orders maps a
    name to one or more permutations of range(N), first = backfilled first; steps = B.
    Returns ``{name: BackfillCurve}`` with percentages, mAP over queries that have a positive.
    """
    q = as_float_tensor(query, "query")
    gn = as_float_tensor(gallery_new, "new gallery").to(q.device)
    go = as_float_tensor(gallery_old, "h(old) gallery").to(q.device)
    if gn.shape != go.shape:
        raise UserError(f"new and h(old) galleries differ in shape: {tuple(gn.shape)} vs {tuple(go.shape)}")
    if q.shape[1] != gn.shape[1]:
        raise UserError(f"queries are {q.shape[1]}-d but the gallery is {gn.shape[1]}-d")
    if steps < 0:
        raise UserError(f"eval_params.backfilling must be >= 0 intermediate steps, got {steps}")
    nq, ng, dev = q.shape[0], gn.shape[0], q.device
    if exclude_self and nq != ng:
        raise UserError(f"leave-one-out needs as many queries as gallery items ({nq} vs {ng})")
    ql = as_labels(query_labels, nq, "query_labels", dev)
    gl = as_labels(gallery_labels, ng, "gallery_labels", dev)
    ks = check_topk(topk)
    check_chunk(chunk_size)

    gal_new = prepare_gallery(gn, gl, metric)
    gal_old = prepare_gallery(go, gl, metric)  # same labels: the same column order
    qn = normalize(q) if metric == "cosine" else q
    counts = curve_points(ng, steps)
    # col_of_item[i]: the (label-sorted) column of gallery item i.
    col_of_item = torch.empty_like(gal_new.order)
    col_of_item[gal_new.order] = torch.arange(ng, device=dev)
    runs: list[tuple[str, torch.Tensor]] = []
    for name, perms in orders.items():
        for perm in perms:
            perm = torch.as_tensor(perm, dtype=torch.int64)
            if perm.shape != (ng,) or not torch.equal(torch.sort(perm).values, torch.arange(ng)):
                raise UserError(f"backfilling order '{name}' is not a permutation of the {ng} gallery items")
            runs.append((name, col_of_item[perm.to(dev)]))

    npts = len(counts)
    hits = {k: torch.zeros((len(runs), npts), dtype=torch.int64) for k in ks}
    ap_sum = torch.zeros((len(runs), npts), dtype=torch.float64)
    n_map = 0
    # Two more key blocks (new, h(old)) beside the counting pass's own (the mixed one).
    c = chunk_rows(nq, ng, compute_map, dev, chunk_size, extra_bytes_per_pair=8)
    kn_buf = torch.empty((c, ng), dtype=torch.float32, device=dev)
    ko_buf = torch.empty_like(kn_buf)
    mix_buf = torch.empty_like(kn_buf)
    counter = Counter(c, ng, compute_map, dev)
    blocks = query_blocks(ql, gal_new, exclude_self)
    with full_precision_matmul():
        for s in chunk_starts(nq, c, progress, desc="backfilling"):
            e = min(s + c, nq)
            n = e - s
            kn = ranking_keys(qn[s:e], gal_new, kn_buf[:n])
            ko = ranking_keys(qn[s:e], gal_old, ko_buf[:n])
            blocks.hide_self(kn, s)
            blocks.hide_self(ko, s)
            mixed = mix_buf[:n]
            for r, (_, cols) in enumerate(runs):
                mixed.copy_(ko)
                for i, upto in enumerate(counts):
                    if i > 0 and upto > counts[i - 1]:
                        idx = cols[counts[i - 1]:upto]
                        mixed.index_copy_(1, idx, kn.index_select(1, idx))
                    st = counter.count(mixed, blocks, s)
                    first = st.neg_before_first + 1
                    has = st.npos > 0
                    for k in ks:
                        hits[k][r, i] += int((has & (first <= k)).sum())
                    if st.ap is not None:
                        ap_sum[r, i] += float(st.ap[has].sum())
            n_map += int((blocks.num_positives[s:e] > 0).sum())

    fractions = [u / ng for u in counts]
    curves: dict[str, BackfillCurve] = {}
    for r, (name, _) in enumerate(runs):
        curve = curves.setdefault(name, BackfillCurve(name, fractions, {}, queries_with_positives=n_map))
        row = {f"top{k}": (100.0 * hits[k][r].double() / nq).numpy() for k in ks}
        if compute_map:
            row["mAP"] = (100.0 * ap_sum[r] / n_map).numpy() if n_map else np.full(npts, np.nan)
        for m, v in row.items():
            prev = curve.values.get(m)
            curve.values[m] = v[None, :] if prev is None else np.concatenate([prev, v[None, :]])
    return curves
