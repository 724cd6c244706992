"""Retrieval metrics: hand-worked cases, fast path == naive reference, k-NN backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fct.retrieval.engine as engine_mod
from fct.errors import ConfigError, UserError
from fct.retrieval import KNN_BACKENDS, cmc_from_neighbors, native, rank_queries, retrieval_metrics
from fct.retrieval.engine import QueryRanks, queries_with_positives
from fct.retrieval.metrics import per_class_cmc
from fct.retrieval.reference import naive_distances, naive_retrieval_metrics

# Both ways of counting in the mAP pass: the torch ops, and the compiled kernel when this
# machine can build it (fct.retrieval.native).
COUNTING = [False, pytest.param(True, marks=pytest.mark.skipif(not native.available(),
                                                                reason="no C compiler for the native kernel"))]

KEYS = ("top1", "top3", "top5", "mAP")


def _col(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None]


def _assert_close(fast: dict, ref: dict, keys: tuple[str, ...] = KEYS, tol: float = 1e-4) -> None:
    for k in keys:
        a, b = fast[k], ref[k]
        if b is None:
            assert a is None, (k, fast, ref)
        else:
            assert abs(a - b) <= tol, (k, fast, ref)
    assert fast["num_queries"] == ref["num_queries"]
    assert fast["num_map_queries"] == ref["num_map_queries"]
    assert fast["queries_with_positives"] == ref["queries_with_positives"]


# ---------------------------------------------------------------- hand-worked cases


def test_leave_one_out_by_hand() -> None:
    # 1-D points x = [0, 1, 3, 6, 10, 20], labels [0, 0, 1, 0, 1, 2]; squared L2 distances.
    # q0 (x=0, y=0): 1(+) d1, 3(-) d9, 6(+) d36, 10(-), 20(-)  -> positives at ranks 1, 3:
    #     AP = (1/1 + 2/3) / 2 = 5/6; first positive rank 1.
    # q1 (x=1, y=0): 0(+) d1, 3(-) d4, 6(+) d25, ...            -> ranks 1, 3: AP = 5/6.
    # q2 (x=3, y=1): 1(-) d4, 0(-) d9, 6(-) d9, 10(+) d49, 20   -> rank 4: AP = 1/4.
    # q3 (x=6, y=0): 3(-) d9, 10(-) d16, 1(+) d25, 0(+) d36     -> ranks 3, 4: AP = (1/3 + 2/4)/2 = 5/12.
    # q4 (x=10, y=1): 6(-) d16, 3(+) d49, ...                   -> rank 2: AP = 1/2.
    # q5 (x=20, y=2): its only same-label item is itself -> no positive: skipped in mAP,
    #     a miss for every top-k.
    # top1: q0, q1 = 2/6; top3: q0, q1, q3, q4 = 4/6; top5: + q2 = 5/6.
    # mAP = (5/6 + 5/6 + 1/4 + 5/12 + 1/2) / 5 = (34/12) / 5 = 34/60.
    x = _col([0, 1, 3, 6, 10, 20])
    y = torch.tensor([0, 0, 1, 0, 1, 2])
    expected = {"top1": 100 * 2 / 6, "top3": 100 * 4 / 6, "top5": 100 * 5 / 6, "mAP": 100 * 34 / 60}
    for backend in ("torch", "faiss"):
        if backend == "faiss":
            pytest.importorskip("faiss")
        got = retrieval_metrics(x, y, x, y, exclude_self=True, topk=(1, 3, 5), knn_backend=backend)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, abs=1e-9), (backend, k, got)
        assert got["num_queries"] == 6 and got["num_map_queries"] == 5
    ref = naive_retrieval_metrics(x, y, x, y, exclude_self=True, topk=(1, 3, 5))
    for k, v in expected.items():
        assert ref[k] == pytest.approx(v, abs=1e-9), k
    ranks = rank_queries(x, y, x, y, exclude_self=True)
    assert ranks.first_positive_rank.tolist() == [1, 1, 4, 3, 2, 0]
    assert ranks.num_positives.tolist() == [2, 2, 1, 2, 1, 0]
    ap = ranks.ap
    assert ap is not None
    assert torch.allclose(ap[:5], torch.tensor([5 / 6, 5 / 6, 1 / 4, 5 / 12, 1 / 2], dtype=ap.dtype))
    assert math.isnan(float(ap[5]))


def test_without_leave_one_out_the_query_finds_itself() -> None:
    x = _col([0, 1, 3, 6, 10, 20])
    y = torch.tensor([0, 0, 1, 0, 1, 2])
    got = retrieval_metrics(x, y, x, y, exclude_self=False, topk=(1,))
    assert got["top1"] == 100.0
    assert got["num_map_queries"] == 6


def test_pessimistic_ties() -> None:
    # Query x=0 (label 0) against a separate gallery.
    # Gallery A: -1 (label 0) and +1 (label 1) are tied at distance 1, then 2 (label 0) at 4.
    #   The tied negative ranks first: positives at ranks 2 and 3,
    #   AP = (1/2 + 2/3) / 2 = 7/12; top-1 miss, top-2 hit.
    q = _col([0])
    qy = torch.tensor([0])
    g = _col([-1, 1, 2])
    gy = torch.tensor([0, 1, 0])
    got = retrieval_metrics(q, qy, g, gy, topk=(1, 2))
    assert got["top1"] == 0.0 and got["top2"] == 100.0
    assert got["mAP"] == pytest.approx(100 * 7 / 12)
    # Gallery B: two positives and one negative all tied at distance 1, a positive at 9.
    #   Ranks of the positives: 0+1+1 = 2, 1+1+1 = 3, 2+1+1 = 4;
    #   AP = (1/2 + 2/3 + 3/4) / 3 = 23/36.
    g = _col([1, -1, 1, 3])
    gy = torch.tensor([0, 0, 1, 0])
    got = retrieval_metrics(q, qy, g, gy, topk=(1,))
    assert got["top1"] == 0.0
    assert got["mAP"] == pytest.approx(100 * 23 / 36)
    ref = naive_retrieval_metrics(q, qy, g, gy, topk=(1,))
    assert ref["mAP"] == pytest.approx(100 * 23 / 36)


def test_query_label_absent_from_gallery_is_skipped() -> None:
    # Query 0 (label 0): nearest is 1 (label 0): AP 1. Query 1 (label 7): no positive at all:
    # a top-1 miss, left out of mAP. top1 = 1/2, mAP = 1.
    q = _col([0, 5])
    qy = torch.tensor([0, 7])
    g = _col([1, 4])
    gy = torch.tensor([0, 1])
    got = retrieval_metrics(q, qy, g, gy, topk=(1,))
    assert got["top1"] == 50.0 and got["mAP"] == 100.0 and got["num_map_queries"] == 1
    assert got["queries_with_positives"] == 1
    # No query with a positive: mAP is undefined: None (JSON null), never NaN.
    got = retrieval_metrics(q[1:], qy[1:], g, gy, topk=(1,))
    assert got["top1"] == 0.0 and got["mAP"] is None
    assert got["queries_with_positives"] == 0 and got["num_map_queries"] == 0
    ref = naive_retrieval_metrics(q[1:], qy[1:], g, gy, topk=(1,))
    assert ref["mAP"] is None and ref["queries_with_positives"] == 0


def test_cosine_uses_l2_normalisation() -> None:
    # Query (1, 0), label 0. Cosine similarities: (2, 0)+ 1.0, (1, 1)- 0.707, (0, 3)- 0,
    # (-1, 0.1)+ -0.995 -> positives at ranks 1 and 4: AP = (1 + 2/4) / 2 = 3/4, top-1 hit.
    # Under raw squared L2 the same gallery gives (1, 1)- and (2, 0)+ tied at 1 (negative
    # first), then (-1, 0.1)+ at 4.01: positive ranks 2, 3: AP = (1/2 + 2/3) / 2 = 7/12.
    q = torch.tensor([[1.0, 0.0]])
    qy = torch.tensor([0])
    g = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-1.0, 0.1]])
    gy = torch.tensor([0, 1, 1, 0])
    cos = retrieval_metrics(q, qy, g, gy, metric="cosine", topk=(1,))
    assert cos["top1"] == 100.0 and cos["mAP"] == pytest.approx(75.0)
    l2 = retrieval_metrics(q, qy, g, gy, metric="l2", topk=(1,))
    assert l2["top1"] == 0.0 and l2["mAP"] == pytest.approx(100 * 7 / 12)


def test_cmc_from_neighbors() -> None:
    nl = torch.tensor([[1, 0, 0], [2, 2, 3], [5, 5, 5]])
    ql = torch.tensor([0, 3, 5])
    # First hits at positions 2, 3, 1.
    got = cmc_from_neighbors(nl, ql, topk=(1, 2, 3))
    assert got == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top3": 100.0})
    with pytest.raises(UserError):
        cmc_from_neighbors(nl, ql, topk=(4,))


def test_input_errors() -> None:
    x = torch.zeros(4, 3)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(UserError, match="exclude_self"):
        retrieval_metrics(x, y, x[:3], y[:3], exclude_self=True)
    with pytest.raises(UserError, match="dimension"):
        retrieval_metrics(x, y, torch.zeros(4, 2), y)
    with pytest.raises(UserError, match="metric"):
        retrieval_metrics(x, y, x, y, metric="l1")
    with pytest.raises(UserError, match="labels"):
        retrieval_metrics(x, y[:3], x, y)
    with pytest.raises(UserError, match="NaN"):
        retrieval_metrics(torch.full((4, 3), float("nan")), y, x, y)
    with pytest.raises(UserError, match="chunk_size"):
        retrieval_metrics(x, y, x, y, chunk_size=0)
    with pytest.raises(ConfigError, match="valid: faiss, torch"):
        retrieval_metrics(x, y, x, y, knn_backend="annoy")


def test_progress_bar_and_input_dtypes(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _grid_data(50, 4, 5, seed=4)
    a = retrieval_metrics(x, y, x, y, exclude_self=True, chunk_size=16, progress=True)
    b = retrieval_metrics(x.double(), y.int(), x.double(), y.int(), exclude_self=True)
    assert a == b
    assert "retrieval" in capsys.readouterr().err


# ---------------------------------------------------------------- fast path == naive


def _grid_data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features on a 1/4 grid: float32 arithmetic on them is exact, so the fast path
    and the float64 reference see identical distances, ties included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(n, d, generator=gen) * 8) / 4
    return x, torch.randint(0, classes, (n,), generator=gen)


def _cosine_grid_data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """+-1 on a random support of 1, 4 or 16 coordinates, times a power of two: the unit
    vectors and their inner products are exact in float32 (many exact ties, too)."""
    gen = torch.Generator().manual_seed(seed)
    supports = torch.tensor([s for s in (1, 4, 16) if s <= d])
    size = supports[torch.randint(len(supports), (n,), generator=gen)]
    # The first `size` coordinates of a random permutation of each row form its support.
    rank = torch.rand(n, d, generator=gen).argsort(1).argsort(1)
    signs = torch.randint(0, 2, (n, d), generator=gen).float() * 2 - 1
    scale = 2.0 ** torch.randint(-2, 4, (n, 1), generator=gen).float()
    x = torch.where(rank < size[:, None], signs, 0.0) * scale
    return x, torch.randint(0, classes, (n,), generator=gen)


CASES = [
    # (n, d, classes)
    (1, 2, 1),
    (7, 2, 2),
    (7, 16, 7),
    (100, 2, 3),
    (100, 16, 30),
    (100, 128, 10),
    (1000, 2, 200),
    (1000, 16, 3),
    (1000, 128, 100),
]


@pytest.mark.parametrize("n,d,classes", CASES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fast_equals_naive_leave_one_out(n: int, d: int, classes: int, metric: str) -> None:
    make = _grid_data if metric == "l2" else _cosine_grid_data
    x, y = make(n, d, classes, seed=n + d + classes)
    ref = naive_retrieval_metrics(x, y, x, y, metric=metric, exclude_self=n > 1, topk=(1, 3, 5))
    # Small chunks cross chunk boundaries; an odd size leaves a ragged last chunk.
    for chunk in (None, 3 if n <= 7 else 7 if n <= 100 else 77):
        got = retrieval_metrics(
            x, y, x, y, metric=metric, exclude_self=n > 1, topk=(1, 3, 5), chunk_size=chunk
        )
        _assert_close(got, ref)
    # Also as numpy arrays, and without leave-one-out.
    got = retrieval_metrics(x.numpy(), y.numpy(), x.numpy(), y.numpy(), metric=metric, topk=(1, 3, 5))
    _assert_close(got, naive_retrieval_metrics(x, y, x, y, metric=metric, topk=(1, 3, 5)))


@pytest.mark.parametrize("use_native", COUNTING)
@pytest.mark.parametrize("num_buckets", [0, 1, 5, 64, 5000])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_both_counting_methods_equal_naive(
    monkeypatch: pytest.MonkeyPatch, num_buckets: int, metric: str, use_native: bool
) -> None:
    # Force the count: 0 = searchsorted (torch; the kernel then picks its own count); n buckets
    # per row, from very coarse (nearly every item needs the exact search) to very fine.
    monkeypatch.setattr(engine_mod, "_FORCE_NUM_BUCKETS", num_buckets)
    monkeypatch.setattr(engine_mod, "_USE_NATIVE", use_native)
    make = _grid_data if metric == "l2" else _cosine_grid_data
    for n, d, classes in [(300, 2, 4), (300, 16, 60), (400, 32, 5)]:
        x, y = make(n, d, classes, seed=n * d)
        ref = naive_retrieval_metrics(x, y, x, y, metric=metric, exclude_self=True, topk=(1, 5))
        got = retrieval_metrics(x, y, x, y, metric=metric, exclude_self=True, chunk_size=64)
        _assert_close(got, ref, keys=("top1", "top5", "mAP"))


@pytest.mark.parametrize("use_native", COUNTING)
@pytest.mark.parametrize("num_buckets", [1, 64])
def test_bucket_counting_with_many_ties_and_duplicates(
    monkeypatch: pytest.MonkeyPatch, num_buckets: int, use_native: bool
) -> None:
    monkeypatch.setattr(engine_mod, "_FORCE_NUM_BUCKETS", num_buckets)
    monkeypatch.setattr(engine_mod, "_USE_NATIVE", use_native)
    gen = torch.Generator().manual_seed(3)
    # Integer points on a line: many exact duplicates (distance 0) and equal distances.
    x = torch.randint(-4, 5, (400, 1), generator=gen).float()
    y = torch.randint(0, 3, (400,), generator=gen)
    for exclude in (True, False):
        ref = naive_retrieval_metrics(x, y, x, y, exclude_self=exclude, topk=(1, 5))
        got = retrieval_metrics(x, y, x, y, exclude_self=exclude, chunk_size=50)
        _assert_close(got, ref, keys=("top1", "top5", "mAP"))


@pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")
@pytest.mark.parametrize("threads", [1, 3])
def test_native_histogram_by_hand_and_against_searchsorted(threads: int) -> None:
    # Row 0, positives 1, 2, 2 (sorted): items 0 / 1 / 1.5 / 2 / 3 / +inf have 0 / 0 / 1 / 1 / 3 /
    # 3 positives strictly below -> histogram [2, 2, 0, 2]. Row 1 has no positive: all in bin 0.
    keys = torch.tensor([[0.0, 1.0, 1.5, 2.0, 3.0, float("inf")], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    pos = torch.tensor([[1.0, 2.0, 2.0], [float("inf")] * 3])
    npos = torch.tensor([3, 0])
    for nb in (1, 2, 1000):
        hist = native.count_below_histogram(keys, pos, npos, nb, threads=threads)
        assert hist.tolist() == [[2, 2, 0, 2], [6, 0, 0, 0]]
    # Random rows with many ties (integer keys), padding and +inf entries, against searchsorted.
    gen = torch.Generator().manual_seed(0)
    c, ng, p = 37, 500, 12
    keys = torch.randint(-20, 20, (c, ng), generator=gen).float()
    keys[:, 7] = float("inf")
    npos = torch.randint(0, p + 1, (c,), generator=gen)
    pos = torch.randint(-20, 20, (c, p), generator=gen).float()
    pos[torch.arange(p)[None, :] >= npos[:, None]] = float("inf")
    pos = pos.sort(1).values
    want = torch.stack([torch.bincount(torch.searchsorted(pos[r], keys[r]), minlength=p + 1) for r in range(c)])
    for nb in (1, 3, 64, 5000):
        assert torch.equal(native.count_below_histogram(keys, pos, npos, nb, threads=threads), want)


def test_native_kernel_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCT_NATIVE", "0")
    assert not native.available()
    monkeypatch.setattr(engine_mod, "_USE_NATIVE", None)
    assert not engine_mod._native_counting(torch.device("cpu"))
    x, y = _grid_data(200, 8, 10, seed=1)
    ref = naive_retrieval_metrics(x, y, x, y, exclude_self=True, topk=(1, 5))
    _assert_close(retrieval_metrics(x, y, x, y, exclude_self=True), ref, keys=("top1", "top5", "mAP"))


def test_auto_counting_picks_buckets_for_many_classes() -> None:
    assert engine_mod._num_buckets(100, 10_000) > 0  # CIFAR-100 leave-one-out
    assert engine_mod._num_buckets(50, 50_000) > 0  # ImageNet-1k validation
    assert engine_mod._num_buckets(500, 1000) == 0  # two classes: searchsorted


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fast_equals_naive_separate_query_and_gallery(metric: str) -> None:
    make = _grid_data if metric == "l2" else _cosine_grid_data
    q, qy = make(150, 16, 12, seed=1)
    g, gy = make(400, 16, 15, seed=2)  # labels 12..14 never queried; some queries may lack positives
    ref = naive_retrieval_metrics(q, qy, g, gy, metric=metric, topk=(1, 3, 5))
    for chunk in (None, 1, 64):
        _assert_close(retrieval_metrics(q, qy, g, gy, metric=metric, topk=(1, 3, 5), chunk_size=chunk), ref)


def test_fast_equals_naive_on_continuous_data() -> None:
    # Gaussian features: distances differ in rounding between float32 and float64, but
    # near-ties between a positive and a negative are vanishingly rare at this size.
    gen = torch.Generator().manual_seed(5)
    centres = torch.randn(10, 32, generator=gen)
    y = torch.randint(0, 10, (300,), generator=gen)
    x = centres[y] + 1.5 * torch.randn(300, 32, generator=gen)
    for metric in ("l2", "cosine"):
        ref = naive_retrieval_metrics(x, y, x, y, metric=metric, exclude_self=True, topk=(1, 3, 5))
        _assert_close(retrieval_metrics(x, y, x, y, metric=metric, exclude_self=True, topk=(1, 3, 5)), ref)


def test_compute_map_false_gives_same_cmc() -> None:
    x, y = _grid_data(200, 8, 20, seed=9)
    full = retrieval_metrics(x, y, x, y, exclude_self=True, chunk_size=33)
    cmc = retrieval_metrics(x, y, x, y, exclude_self=True, compute_map=False, chunk_size=33)
    assert cmc["mAP"] is None and cmc["num_map_queries"] is None
    assert cmc["top1"] == full["top1"] and cmc["top5"] == full["top5"]
    assert cmc["queries_with_positives"] == full["queries_with_positives"] == full["num_map_queries"]
    # the count from labels alone (the FAISS path without mAP): labels 0, 0, 1, 2 and a gallery 0, 1, 1, 3
    ql, gl = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 3])
    assert queries_with_positives(ql, gl, exclude_self=False) == 3  # label 2 is not in the gallery
    assert queries_with_positives(ql, gl, exclude_self=True) == 2  # query 0's only positive is itself
    assert queries_with_positives(y, y, exclude_self=True) == full["queries_with_positives"]


def _naive_first_positive_rank(q: torch.Tensor, qy: torch.Tensor, g: torch.Tensor, gy: torch.Tensor,
                               exclude_self: bool) -> list[int]:
    """1 + the negatives at distance <= the nearest positive (pessimistic ties); 0 without one."""
    dist = naive_distances(q, g, "l2")
    out = []
    for i in range(len(qy)):
        keep = np.arange(len(gy)) != i if exclude_self else np.ones(len(gy), dtype=bool)
        pos = keep & (gy.numpy() == int(qy[i]))
        if not pos.any():
            out.append(0)
            continue
        nearest = dist[i, pos].min()
        out.append(1 + int((keep & ~pos & (dist[i] <= nearest)).sum()))
    return out


@pytest.mark.parametrize("use_native", COUNTING)
def test_one_pass_serves_every_metric(monkeypatch: pytest.MonkeyPatch, use_native: bool) -> None:
    # The ranks of the pass with mAP equal those of the CMC-only pass and the naive ranks, and the
    # metrics taken from them equal the metrics of a pass of their own.
    monkeypatch.setattr(engine_mod, "_USE_NATIVE", use_native)
    x, y = _grid_data(300, 4, 40, seed=4)
    q, qy = x[:120], y[:120]
    for exclude_self, (qq, qqy) in ((True, (x, y)), (False, (q, qy))):
        naive = _naive_first_positive_rank(qq, qqy, x, y, exclude_self)
        cmc_only = rank_queries(qq, qqy, x, y, exclude_self=exclude_self, compute_map=False)
        assert cmc_only.ap is None and cmc_only.first_positive_rank.tolist() == naive
        for compute_map in (True, False):
            ranks = rank_queries(qq, qqy, x, y, exclude_self=exclude_self, compute_map=compute_map, chunk_size=37)
            assert torch.equal(ranks.first_positive_rank, cmc_only.first_positive_rank)
            assert torch.equal(ranks.num_positives, cmc_only.num_positives)
            kw = dict(exclude_self=exclude_self, compute_map=compute_map, topk=(1, 2, 5))
            assert retrieval_metrics(qq, qqy, x, y, ranks=ranks, **kw) == retrieval_metrics(qq, qqy, x, y, **kw)
    with pytest.raises(ValueError, match="without AP"):
        retrieval_metrics(x, y, x, y, exclude_self=True, ranks=cmc_only)


def test_per_class_cmc_by_hand() -> None:
    # Ranks of the nearest positive: class 0 queries 1, 3, 0 (no positive); class 5 queries 2, 1.
    ranks = QueryRanks(num_positives=torch.tensor([1, 1, 0, 4, 4]),
                       first_positive_rank=torch.tensor([1, 3, 0, 2, 1]), ap=None)
    got = per_class_cmc(ranks, torch.tensor([0, 0, 0, 5, 5]), (1, 3))
    assert got == {
        "0": {"top1": pytest.approx(100 / 3), "top3": pytest.approx(200 / 3), "queries": 3,
              "queries_with_positives": 2},
        "5": {"top1": 50.0, "top3": 100.0, "queries": 2, "queries_with_positives": 2},
    }


# ---------------------------------------------------------------- k-NN backends


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_torch_matches_full_sort(metric: str, exclude_self: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(120, 8, generator=gen)
    values, idx = KNN_BACKENDS.get("torch")(x, x, 5, metric=metric, exclude_self=exclude_self, chunk_size=17)
    dist = naive_distances(x, x, metric)
    if exclude_self:
        np.fill_diagonal(dist, np.inf)
    expect_idx = np.argsort(dist, axis=1, kind="stable")[:, :5]
    assert np.array_equal(idx.numpy(), expect_idx)
    expect = np.take_along_axis(dist, expect_idx, axis=1)
    got = values.double().numpy() if metric == "l2" else -values.double().numpy()
    assert np.allclose(got, expect, atol=1e-4)
    if exclude_self:
        assert not (idx == torch.arange(120)[:, None]).any()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_equals_torch(metric: str, exclude_self: bool) -> None:
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(12)
    centres = torch.randn(20, 24, generator=gen)
    y = torch.randint(0, 20, (600,), generator=gen)
    x = centres[y] + torch.randn(600, 24, generator=gen)
    tv, ti = KNN_BACKENDS.get("torch")(x, x, 10, metric, exclude_self)
    fv, fi = KNN_BACKENDS.get("faiss")(x, x, 10, metric, exclude_self)
    assert torch.allclose(tv, fv, atol=1e-3, rtol=1e-4)
    assert (ti == fi).float().mean() > 0.999  # only float near-ties may swap
    a = retrieval_metrics(x, y, x, y, metric=metric, exclude_self=exclude_self, knn_backend="torch")
    b = retrieval_metrics(x, y, x, y, metric=metric, exclude_self=exclude_self, knn_backend="faiss")
    _assert_close(a, b, keys=("top1", "top5", "mAP"))


def test_knn_rejects_too_many_neighbours() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(UserError, match="k=5"):
        KNN_BACKENDS.get("torch")(x, x, 5, exclude_self=True)
