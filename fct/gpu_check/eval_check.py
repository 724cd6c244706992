"""Exact evaluation at scale on the GPU: the ranking engine (CMC top-k and full mAP), the torch
top-k neighbour lists, and FAISS's flat GPU index when a GPU build of faiss is installed.

Data: a gallery of clustered embeddings (class centres plus noise) and a separate query set from
the same distribution, on a 1/64 grid as in benchmarks/bench_eval.py: every distance is then an
exact float32 number whatever the order of the sums, so the GPU must give the CPU's ranks exactly
(AP too, up to the float64 rounding of its own mean: ``AP_ATOL``), and FAISS's distances must
equal torch's. Queries are ranked slice by slice against
the whole gallery until all are done or the section's time share is spent (then the measured
rate says how long the rest would take).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fct.gpu_check.results import Result, SectionContext, failed, ok, one_line, rounded, table

# AP is a float64 mean over a query's positives (about 1,000 here), summed in another order on the
# GPU than on the CPU: ~1e-16 apart. The ranks it comes from must be equal exactly.
AP_ATOL = 1e-12


def clustered(n: int, dim: int, classes: int, seed: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) float32 on a 1/64 grid and (n,) int64 labels, made on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen, device=device) / dim**0.5
    labels = torch.randint(0, classes, (n,), generator=gen, device=device)
    x = centres[labels]
    x += 2.0 * torch.randn(n, dim, generator=gen, device=device) / dim**0.5
    return torch.round(x * 64) / 64, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def faiss_gpu_status() -> tuple[Any, str]:
    """(the faiss module, "") when a GPU build that sees a GPU is importable, else (None, why not)."""
    try:
        import faiss
    except ImportError:
        return None, "faiss-gpu not installed"
    if not hasattr(faiss, "StandardGpuResources"):
        return None, "faiss-gpu not installed (the faiss found is a CPU-only build)"
    if faiss.get_num_gpus() == 0:
        return None, "faiss-gpu is installed but sees no GPU"
    return faiss, ""


def exact_eval(ctx: SectionContext) -> Result:
    from fct.retrieval import KNN_BACKENDS, QueryRanks, rank_queries
    from fct.retrieval.metrics import cmc, mean_average_precision

    s = ctx.sizes
    dev = torch.device(s.device)
    g, gl = clustered(s.eval_gallery, s.eval_dim, s.eval_classes, 0, dev)
    q, ql = clustered(s.eval_queries, s.eval_dim, s.eval_classes, 1, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # The engine, slice by slice, while the time share lasts (about half of it: the rest is for
    # the neighbour lists and the CPU check).
    parts: list[QueryRanks] = []
    done, t0 = 0, time.perf_counter()
    while done < s.eval_queries and (not parts or ctx.elapsed() < ctx.budget_s / 2):
        e = min(done + s.eval_slice, s.eval_queries)
        parts.append(rank_queries(q[done:e], ql[done:e], g, gl, metric="l2", compute_map=True))
        _sync(dev)
        done = e
    engine_s = max(time.perf_counter() - t0, 1e-9)
    ranks = QueryRanks(torch.cat([p.num_positives for p in parts]),
                       torch.cat([p.first_positive_rank for p in parts]),
                       torch.cat([p.ap for p in parts if p.ap is not None]))
    metrics = {**cmc(ranks, (1, s.eval_k)), "mAP": mean_average_precision(ranks)}
    pairs_per_s = done * s.eval_gallery / engine_s
    engine = {"queries_ranked": done, "seconds": round(engine_s, 3),
              "queries_per_s": round(done / engine_s, 1),
              "projected_s_all_gallery_as_queries": round(s.eval_gallery**2 / pairs_per_s, 1),
              "metrics": {k: rounded(v, 4) for k, v in metrics.items()},
              "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
              if dev.type == "cuda" else None}

    # The same ranks on the CPU for a few queries: identical (grid data).
    n_chk = min(s.eval_check_queries, done)
    ref = rank_queries(q[:n_chk].cpu(), ql[:n_chk].cpu(), g.cpu(), gl.cpu(), metric="l2", compute_map=True)
    same_rank = bool(torch.equal(ref.first_positive_rank, ranks.first_positive_rank[:n_chk].cpu()))
    a, b = ref.ap, ranks.ap[:n_chk].cpu()  # NaN: a query without a positive, on both sides alike
    defined = ~a.isnan()
    same_rank = same_rank and bool(torch.equal(defined, ~b.isnan()))
    ap_diff = float((a - b)[defined].abs().max()) if bool(defined.any()) else 0.0
    check = {"queries": n_chk, "first_positive_rank_equal": same_rank, "ap_max_abs_diff": ap_diff}

    # Top-k neighbour lists: torch on the device, then FAISS's flat GPU index.
    nk = min(s.eval_knn_queries, s.eval_queries)
    t = time.perf_counter()
    tv, ti = KNN_BACKENDS.get("torch")(q[:nk], g, s.eval_k, metric="l2")
    _sync(dev)
    knn = {"queries": nk, "k": s.eval_k, "torch": {"seconds": round(time.perf_counter() - t, 3)}}
    faiss, why = faiss_gpu_status()
    if faiss is not None and dev.type != "cuda":
        faiss, why = None, "no CUDA device (the CPU run)"
    if faiss is None:
        knn["faiss_gpu"] = {"status": "skipped", "reason": why}
    else:
        try:
            t = time.perf_counter()
            fv, fi = KNN_BACKENDS.get("faiss")(q[:nk], g, s.eval_k, metric="l2")
            _sync(dev)
            sec = time.perf_counter() - t
            same_values = bool(torch.allclose(fv.to(dev), tv, rtol=0, atol=1e-6))
            agree = float((fi.to(dev)[:, 0] == ti[:, 0]).float().mean())
            knn["faiss_gpu"] = {"status": "ok" if same_values else "failed",
                                "reason": None if same_values else "FAISS distances differ from torch's",
                                "seconds": round(sec, 3), "version": getattr(faiss, "__version__", None),
                                "gpus": int(faiss.get_num_gpus()), "distances_equal": same_values,
                                "top1_index_agreement": round(agree, 5)}
        except Exception as e:  # noqa: BLE001 - recorded; the engine's results still stand
            knn["faiss_gpu"] = {"status": "failed", "reason": one_line(e)}
    fields = dict(gallery=s.eval_gallery, dim=s.eval_dim, classes=s.eval_classes, queries=s.eval_queries,
                  device=s.device, engine=engine, cpu_check=check, knn=knn,
                  table=table(["what", "queries", "seconds", "queries/s"],
                              [["engine: top-1, top-5, full mAP", done, engine["seconds"],
                                engine["queries_per_s"]],
                               [f"torch top-{s.eval_k} lists", nk, knn["torch"]["seconds"],
                                round(nk / max(knn["torch"]["seconds"], 1e-9), 1)],
                               [f"faiss-gpu flat top-{s.eval_k} lists", nk, knn["faiss_gpu"].get("seconds"),
                                round(nk / knn["faiss_gpu"]["seconds"], 1) if "seconds" in knn["faiss_gpu"]
                                else knn["faiss_gpu"]["reason"]]]))
    if not (same_rank and ap_diff <= AP_ATOL):
        return failed(f"the device's ranks differ from the CPU's on {n_chk} queries "
                      f"(ranks equal: {same_rank}, AP max diff {ap_diff:.2e})", **fields)
    if knn["faiss_gpu"]["status"] == "failed":
        return failed(f"faiss-gpu: {knn['faiss_gpu']['reason']}", **fields)
    summary = (f"{done:,} queries x {s.eval_gallery:,} x {s.eval_dim}-d with full mAP in {engine_s:.1f} s "
               f"({engine['queries_per_s']:,.0f} queries/s; the whole gallery as queries: "
               f"~{engine['projected_s_all_gallery_as_queries']:,.0f} s), = CPU on {n_chk} queries; "
               "faiss-gpu: "
               + (f"{knn['faiss_gpu']['seconds']:.2f} s for {nk:,} top-{s.eval_k} lists"
                  if knn["faiss_gpu"]["status"] == "ok" else knn["faiss_gpu"]["reason"]))
    return ok(summary, **fields)

