"""Benchmark of approximate k-NN search (fct.retrieval.ann) on a gallery exact search cannot serve.

Data: N clustered Gaussian embeddings (``--clusters`` centres drawn from N(0, I), each point a
centre plus ``--spread`` times N(0, I) noise; seeded) and ``--queries`` separate query vectors
drawn the same way (so no query is in the gallery), metric l2.

For each index (IVF-Flat, IVF-PQ, IVF-PQ re-ranked, HNSW), in a fresh subprocess so that its peak RSS is its own:
the build time (training on a seeded sample, then adding all N), the index's size as faiss
serialises it, and for each search setting (``nprobe`` for IVF, ``ef_search`` for HNSW, changed
on the built index): the time to find the k nearest of every query, and recall@1 / recall@k
against exact search on a seeded sample of the queries (``fct.retrieval.ann.sampled_recall``, the
definition eval.py reports). The exact row times the torch engine's exact k-NN (``knn_torch``) on
that sample. Last, each of ``--eval-backends`` runs eval.py's route (``retrieval_metrics``) over
the whole gallery as its own query set, leave-one-out, with the default ``eval_params.ann``: what
an ``eval.py`` case on stored embeddings of this size costs.

    python benchmarks/bench_ann.py --json runs/bench_ann.json       # 1,000,000 x 128 (see docs/benchmarks/ann.md)
    python benchmarks/bench_ann.py --n 100000 --queries 2000 --recall-queries 200    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fct.config.evaluation import AnnParams  # noqa: E402
from fct.retrieval.ann import build_index, index_bytes, recall_sample, sampled_recall, search_index  # noqa: E402
from fct.retrieval.knn import KNN_BACKENDS, import_faiss  # noqa: E402
from fct.retrieval.metrics import retrieval_metrics  # noqa: E402

BACKENDS = ("faiss_ivf_flat", "faiss_ivf_pq", "faiss_hnsw")
# the search-time parameter each index is swept over (set on the built index between searches)
SWEEP_KEY = {"faiss_ivf_flat": "nprobe", "faiss_ivf_pq": "nprobe", "faiss_hnsw": "ef_search"}


def make_data(n: int, queries: int, dim: int, clusters: int, spread: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gallery (n, dim), its cluster labels (n,) and queries (queries, dim), float32, built in
    blocks (no second n x dim copy)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((m, dim), dtype=np.float32)
        labels = rng.integers(0, clusters, m)
        for s in range(0, m, 100_000):
            e = min(s + 100_000, m)
            block = rng.standard_normal((e - s, dim), dtype=np.float32)
            block *= spread
            block += centres[labels[s:e]]
            out[s:e] = block
        return out, labels

    gallery, labels = draw(n)
    return gallery, labels, draw(queries)[0]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One index (or 'exact'), in its own process: its results as a dict (printed as one JSON line)."""
    g, labels, q = make_data(args.n, args.queries, args.dim, args.clusters, args.spread, args.seed)
    gallery, query = torch.from_numpy(g), torch.from_numpy(q)
    sample = recall_sample(args.queries, args.recall_queries, args.seed)
    ks = sorted({1, args.k})
    # peak RSS once the data exist (torch, faiss and the gallery), before any index
    out: dict[str, Any] = {"backend": args.child, "rss_data_mib": _rss_mib()}
    if args.child.startswith("eval:"):
        # what eval.py does with this backend on stored embeddings: every gallery item a query,
        # leave-one-out, CMC from the index and recall on the sample
        t0 = time.perf_counter()
        m = retrieval_metrics(gallery, labels, gallery, labels, exclude_self=True, topk=(1, args.k), compute_map=False,
                              knn_backend=args.child.split(":", 1)[1], ann=AnnParams(seed=args.seed))
        out.update(seconds=time.perf_counter() - t0, metrics=m, peak_rss_mib=_rss_mib())
        return out
    if args.child == "exact":
        t0 = time.perf_counter()
        _, idx = KNN_BACKENDS.get("torch")(query[sample], gallery, args.k)
        out["rows"] = [{"setting": None, "queries": len(sample), "search_s": time.perf_counter() - t0,
                        "recall": {str(k): 1.0 for k in ks}}]
        out["peak_rss_mib"] = _rss_mib()
        return out
    backend, _, refine = args.child.partition(":")  # faiss_ivf_pq:refine re-ranks with --refine-factor
    key = SWEEP_KEY[backend]
    sweep = args.nprobe if key == "nprobe" else args.ef_search
    params = AnnParams(nlist=args.nlist, nprobe=sweep[0], hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                       ef_search=sweep[0], pq_m=args.pq_m, seed=args.seed,
                       refine_factor=args.refine_factor if refine else 1)
    ann = build_index(gallery, backend, "l2", params)
    out.update(params=ann.params, build_s=ann.build_s, index_bytes=index_bytes(ann), rows=[])
    for value in sweep:
        if key == "nprobe":
            (ann.base if ann.base is not None else ann.index).nprobe = value
        else:
            ann.index.hnsw.efSearch = value
        t0 = time.perf_counter()
        _, idx = search_index(ann, query, args.k, exclude_self=False)
        search_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        recall = sampled_recall(query, gallery, idx, ks, sample=sample)
        out["rows"].append({"setting": {key: value}, "queries": args.queries, "search_s": search_s,
                            "recall": {str(k): r for k, r in recall.items()}, "recall_s": time.perf_counter() - t0,
                            "incomplete_lists": int((idx < 0).any(1).sum())})
    out["peak_rss_mib"] = _rss_mib()
    return out


def run_child(name: str, argv: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, *argv, "--child", name], capture_output=True, text=True)
    if r.returncode != 0:
        return {"backend": name, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["child_s"] = time.perf_counter() - t0
    return out


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    raw_mib = args.n * args.dim * 4 / 2**20
    lines = [
        f"| index | parameters | build s | index MiB | bytes / vector | RSS MiB before / peak | search setting "
        f"| queries | search s | queries / s | recall@1 | recall@{args.k} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["backend"].startswith("eval:"):
            continue
        if "error" in r:
            lines.append(f"| {r['backend']} | error: {r['error']} |" + " |" * 10)
            continue
        if r["backend"] == "exact":
            head = ["exact (torch, knn_torch)", "-", "0", f"{raw_mib:.0f} (the float32 gallery)",
                    f"{args.dim * 4}", f"{r['rss_data_mib']:.0f} / {r['peak_rss_mib']:.0f}"]
        else:
            params = ", ".join(f"{k} {v}" for k, v in r["params"].items()
                               if k not in ("nprobe", "ef_search") and not (k == "refine_factor" and v == 1))
            head = [r["backend"], params, f"{r['build_s']:.1f}", f"{r['index_bytes'] / 2**20:.0f}",
                    f"{r['index_bytes'] / args.n:.0f}", f"{r['rss_data_mib']:.0f} / {r['peak_rss_mib']:.0f}"]
        for row in r["rows"]:
            setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items()) if row["setting"] else "-"
            lines.append("| " + " | ".join(head + [
                setting, f"{row['queries']:,}", f"{row['search_s']:.2f}", f"{row['queries'] / row['search_s']:,.0f}",
                f"{row['recall']['1']:.3f}", f"{row['recall'][str(args.k)]:.3f}"]) + " |")
    return lines


def eval_table(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    rows = [r for r in results if r["backend"].startswith("eval:")]
    if not rows:
        return []
    lines = [f"eval.py's route (`retrieval_metrics`), every one of the {args.n:,} gallery items a query, "
             f"leave-one-out, default `eval_params.ann`:", "",
             f"| backend | parameters | total s | build s | search s | recall check s | top-1 | top-{args.k} "
             f"| recall@1 | recall@{args.k} | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend'][5:]} | error: {r['error']} |" + " |" * 9)
            continue
        m, a = r["metrics"], r["metrics"]["ann"]
        params = ", ".join(f"{k} {v}" for k, v in a["params"].items())
        lines.append(f"| {a['backend']} | {params} | {r['seconds']:.1f} | {a['build_s']:.1f} | {a['search_s']:.1f} | "
                     f"{a['recall_s']:.1f} | {m['top1']:.2f} | {m[f'top{args.k}']:.2f} | "
                     f"{a['recall_at_k']['1']:.3f} | {a['recall_at_k'][str(args.k)]:.3f} | {r['peak_rss_mib']:.0f} |")
    return [""] + lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0, help="noise std relative to the centres' (1.0)")
    ap.add_argument("--queries", type=int, default=10_000, help="queries searched for their k nearest")
    ap.add_argument("--recall-queries", type=int, default=1000, help="the seeded sample recall is measured on")
    ap.add_argument("-k", "--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default=",".join(BACKENDS + ("faiss_ivf_pq:refine", "exact")),
                    help="comma-separated; faiss_ivf_pq:refine is IVF-PQ re-ranked with --refine-factor")
    ap.add_argument("--refine-factor", type=int, default=4, help="candidates re-ranked per neighbour (IVF-PQ refine)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default: eval_params.ann's, 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 64], help="IVF settings searched")
    ap.add_argument("--pq-m", type=int, default=None)
    ap.add_argument("--hnsw-m", type=int, default=AnnParams.hnsw_m)
    ap.add_argument("--ef-construction", type=int, default=AnnParams.ef_construction)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128], help="HNSW settings searched")
    ap.add_argument("--eval-backends", default="faiss_ivf_flat",
                    help="comma-separated backends also run through eval.py's route over the whole gallery "
                         "(leave-one-out); empty: none")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    faiss = import_faiss()
    env = (f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), torch {torch.__version__} "
           f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
           f"load average at start {os.getloadavg()[0]:.2f}")
    argv = list(sys.argv[1:])
    results = []
    t0 = time.perf_counter()
    names = [n for n in args.backends.split(",") if n]
    names += [f"eval:{n}" for n in args.eval_backends.split(",") if n]
    for name in names:
        results.append(run_child(name, argv))
        print(f"{name}: done after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    command = " ".join(["python", "benchmarks/bench_ann.py", *argv])
    lines = [f"Command: `{command}`", "",
             f"Data: {args.n:,} x {args.dim} clustered Gaussian ({args.clusters} centres, spread {args.spread}, "
             f"seed {args.seed}), {args.queries:,} queries, l2, recall on {min(args.recall_queries, args.queries):,} "
             f"sampled queries; total {time.perf_counter() - t0:.0f} s.",
             f"Environment: {env}; at end {os.getloadavg()[0]:.2f}.", "", *table(results, args),
             *eval_table(results, args)]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"command": command, "env": env, "args": plain_args, "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
