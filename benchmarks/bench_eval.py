"""Benchmark of the retrieval evaluation (fct.retrieval): speed, peak memory, exactness.

(a) N clustered 128-d embeddings (100 classes), leave-one-out, l2: top-1 / top-5 / full mAP
    with the torch backend, timed in a fresh subprocess whose peak RSS is reported.
(b) At a smaller N: the fast path against the naive reference (full matrix, row sorts,
    Python loop), side by side: speed ratio and the largest metric difference.
(c) FAISS flat index against the torch backend for the top-5 neighbour lists.
(d) One eval.py case with per-class results and a reference case (flips), leave-one-out, l2:
    the evaluated case ranked once, its ranks shared by the metrics, the per-class CMC and the
    flips (what ``evaluate`` does), against a ranking pass for each of the three (what it did
    before the engine returned per-query ranks). Both include the reference case's own pass.
(e) The whole ``eval.py`` process on a stored-embeddings file (N x 128, the same file as query and
    gallery, leave-one-out, top-1/top-5/full mAP, results written) against a bare process that only
    loads the same file and computes the same (N, N) distance GEMM in 4096-row chunks; both timed
    from launch to exit (interpreter start and imports included), alternated, median of repeats.

Embeddings lie on a 1/64 grid so float32 arithmetic on them is exact and both paths see the
same distances (ties included); the ranking is then identical by construction, not by luck.

    python benchmarks/bench_eval.py                     # full run (a: 50k, b: 10k, c: 10k+50k, d: 20k)
    python benchmarks/bench_eval.py --n 20000 --n-small 2000 --knn-sizes 2000 --n-case 2000   # quick
    python benchmarks/bench_eval.py --parts e --repeats 5     # eval.py against a bare GEMM process, 50k
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fct.regression.flips import retrieval_flips  # noqa: E402
from fct.retrieval import KNN_BACKENDS, rank_queries, retrieval_metrics  # noqa: E402
from fct.retrieval.metrics import cmc_from_neighbors, per_class_cmc  # noqa: E402
from fct.retrieval.reference import naive_retrieval_metrics  # noqa: E402

METRIC_KEYS = ("top1", "top5", "mAP")


def make_embeddings(
    n: int, dim: int = 128, classes: int = 100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class centres plus noise (top-1 about 75 %, mAP about 25 % at 10k), on a 1/64 grid."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) / dim**0.5
    labels = torch.arange(n) % classes
    x = centres[labels] + 2.0 * torch.randn(n, dim, generator=gen) / dim**0.5
    return torch.round(x * 64) / 64, labels


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def child_full_eval(n: int) -> None:
    """Part (a), run in its own process: prints one JSON line."""
    x, y = make_embeddings(n)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    m = retrieval_metrics(x, y, x, y, metric="l2", exclude_self=True, topk=(1, 5))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"n": n, "seconds": wall, "cpu_seconds": cpu, "metrics": m,
                      "peak_rss_mib": peak_kib / 1024, "rss_before_eval_mib": rss_before / 1024}))


def run_child(n: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-full", str(n)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def fast_vs_naive(n: int, fast_repeats: int, naive_repeats: int) -> dict[str, Any]:
    x, y = make_embeddings(n, seed=1)
    ft, fast = timed(lambda: retrieval_metrics(x, y, x, y, exclude_self=True), fast_repeats)
    nt, naive = timed(lambda: naive_retrieval_metrics(x, y, x, y, exclude_self=True), naive_repeats)
    diff = max(abs(fast[k] - naive[k]) for k in METRIC_KEYS)
    return {"n": n, "fast_s": statistics.median(ft), "naive_s": statistics.median(nt),
            "fast_runs": ft, "naive_runs": nt, "fast": fast, "naive": naive, "max_abs_diff": diff}


def knn_backends(n: int, repeats: int) -> dict[str, Any]:
    x, y = make_embeddings(n, seed=2)
    rows: dict[str, Any] = {"n": n}
    for backend in ("torch", "faiss"):
        try:
            times, (_, idx) = timed(lambda: KNN_BACKENDS.get(backend)(x, x, 5, exclude_self=True), repeats)
        except Exception as e:  # faiss missing: report, do not fail the benchmark
            rows[backend] = {"error": str(e)}
            continue
        rows[backend] = {"seconds": statistics.median(times), **cmc_from_neighbors(y[idx], y, (1, 5))}
    times, cmc = timed(lambda: retrieval_metrics(x, y, x, y, exclude_self=True, compute_map=False), repeats)
    rows["torch_cmc_only"] = {"seconds": statistics.median(times), "top1": cmc["top1"], "top5": cmc["top5"]}
    return rows


def case_passes(n: int, repeats: int) -> dict[str, Any]:
    """Part (d): the work of one eval.py case with per_class and a reference, by each route;
    runs alternate so that a change of machine load hits both."""
    x, y = make_embeddings(n, seed=3)
    old, _ = make_embeddings(n, seed=4)  # the reference case: other features of the same images
    kw: dict[str, Any] = dict(exclude_self=True)

    def separate() -> dict[str, Any]:
        metrics = retrieval_metrics(x, y, x, y, topk=(1, 5), **kw)
        per_class = per_class_cmc(rank_queries(x, y, x, y, compute_map=False, **kw), y, (1, 5))
        new_rank = rank_queries(x, y, x, y, compute_map=False, **kw).first_positive_rank
        ref_rank = rank_queries(old, y, old, y, compute_map=False, **kw).first_positive_rank
        return {"metrics": metrics, "per_class": per_class, "flips": retrieval_flips(ref_rank, new_rank)["nfr"]}

    def shared() -> dict[str, Any]:
        ranks = rank_queries(x, y, x, y, **kw)
        metrics = retrieval_metrics(x, y, x, y, topk=(1, 5), ranks=ranks, **kw)
        per_class = per_class_cmc(ranks, y, (1, 5))
        ref_rank = rank_queries(old, y, old, y, compute_map=False, **kw).first_positive_rank
        return {"metrics": metrics, "per_class": per_class,
                "flips": retrieval_flips(ref_rank, ranks.first_positive_rank)["nfr"]}

    runs: dict[str, list[float]] = {"separate": [], "shared": []}
    outputs = {}
    for _ in range(repeats):
        for name, fn in (("separate", separate), ("shared", shared)):
            times, outputs[name] = timed(fn, 1)
            runs[name] += times
    return {"n": n, "runs": runs, "identical": outputs["separate"] == outputs["shared"],
            "top1": outputs["shared"]["metrics"]["top1"], "nfr": outputs["shared"]["flips"]}


BARE_GEMM = """
import sys, time
import numpy as np, torch
with np.load(sys.argv[1]) as z:
    x = torch.from_numpy(z["features"])
torch.backends.cuda.matmul.allow_tf32 = False
out = torch.empty((4096, x.shape[0]))
sq = (x * x).sum(1)[None, :]
for s in range(0, x.shape[0], 4096):
    torch.addmm(sq, x[s:s + 4096], x.t(), alpha=-2.0, out=out[: min(4096, x.shape[0] - s)])
"""


def eval_process_vs_bare(n: int, repeats: int, workdir: Path) -> dict[str, Any]:
    """Part (e): wall seconds of an ``eval.py`` process and of a bare load + chunked GEMM process."""
    import numpy as np

    x, y = make_embeddings(n, seed=3)
    feats = workdir / f"embeddings_{n}.npz"
    np.savez(feats, features=x.numpy(), labels=y.numpy())
    cfg = workdir / "eval.yaml"
    cfg.write_text(f"query_features_path: {feats}\ngallery_features_path: {feats}\n"
                   f"eval_params: {{topk: [1, 5], compute_map: true}}\nresults_path: {workdir / 'results.json'}\n"
                   "runtime: {progress: false, tensorboard: false}\n")
    commands = {"eval.py": [sys.executable, str(ROOT / "eval.py"), "--config", str(cfg)],
                "bare": [sys.executable, "-c", BARE_GEMM, str(feats)]}
    runs: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():  # alternated: both see the same machine state
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=workdir)
            runs[name].append(time.perf_counter() - t)
    metrics = json.loads((workdir / "results.json").read_text())
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"n": n, "runs": runs, "median": med, "ratio": med["eval.py"] / med["bare"],
            "metrics": {k: metrics.get(k) for k in METRIC_KEYS}}


def report_e(e: dict[str, Any]) -> list[str]:
    m = e["metrics"]
    return ["", f"(e) whole eval.py process against a bare load + GEMM process, {e['n']:,} x 128-d, "
            "launch to exit, alternated:", "",
            "| process | median s | runs s |", "| --- | --- | --- |",
            *(f"| {k} | {e['median'][k]:.2f} | {', '.join(f'{t:.2f}' for t in e['runs'][k])} |" for k in e["runs"]),
            "", f"Ratio eval.py / bare: **{e['ratio']:.2f}x**; eval.py metrics: top-1 {m['top1']}, "
            f"top-5 {m['top5']}, mAP {m['mAP']}."]


def report_a(a: list[dict[str, Any]], n: int) -> list[str]:
    times = [r["seconds"] for r in a]
    m = a[0]["metrics"]
    return [
        f"(a) {n:,} x 128-d, 100 classes, leave-one-out, l2, top-1/top-5/full mAP, torch backend, "
        f"a fresh process per run ({len(a)} runs):",
        "",
        "| N | wall s (min / median) | runs s | CPU s (median) | peak RSS MiB | RSS before eval MiB "
        "| top-1 | top-5 | mAP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {n:,} | {min(times):.1f} / {statistics.median(times):.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times)} | "
        f"{statistics.median(r['cpu_seconds'] for r in a):.1f} | {max(r['peak_rss_mib'] for r in a):.0f} | "
        f"{a[0]['rss_before_eval_mib']:.0f} | {m['top1']:.2f} | {m['top5']:.2f} | {m['mAP']:.2f} |",
        "",
    ]


def report_b(b: dict[str, Any]) -> list[str]:
    return [
        f"(b) fast vs naive at {b['n']:,}, same data, same run (median of {len(b['fast_runs'])} fast "
        f"runs, {len(b['naive_runs'])} naive):",
        "",
        "| path | seconds | runs s | top-1 | top-5 | mAP |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {name} | {b[name + '_s']:.2f} | {', '.join(f'{t:.2f}' for t in b[name + '_runs'])} | "
          f"{b[name]['top1']:.4f} | {b[name]['top5']:.4f} | {b[name]['mAP']:.6f} |"
          for name in ("fast", "naive")),
        "",
        f"Speed-up {b['naive_s'] / b['fast_s']:.1f}x; largest metric difference {b['max_abs_diff']:.2e} "
        "(percentage points).",
        "",
    ]


def report_c(c: list[dict[str, Any]]) -> list[str]:
    names = ("torch", "faiss", "torch_cmc_only")
    lines = [
        "(c) top-5 neighbour lists, leave-one-out, l2 (median of runs); the CMC-only pass is "
        "`retrieval_metrics(..., compute_map=False)`:",
        "",
        "| N | torch knn s | faiss knn s | torch CMC-only pass s | top-1 torch / faiss / CMC pass "
        "| top-5 torch / faiss / CMC pass |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in c:
        def cells(key: str, r: dict[str, Any] = r) -> list[str]:
            return [f"{r[k][key]:.2f}" if key in r.get(k, {}) else "n/a" for k in names]

        lines.append(
            f"| {r['n']:,} | {' | '.join(cells('seconds'))} | {' / '.join(cells('top1'))} | "
            f"{' / '.join(cells('top5'))} |"
        )
    return lines + [""]


def report_d(d: dict[str, Any]) -> list[str]:
    med = {k: statistics.median(v) for k, v in d["runs"].items()}
    return [
        f"(d) one eval.py case with per_class and a reference (flips), {d['n']:,} x 128-d, leave-one-out, "
        f"l2 (median of {len(d['runs']['shared'])} alternating runs; both include the reference pass):",
        "",
        "| route | passes over the evaluated case | seconds | runs s |",
        "| --- | --- | --- | --- |",
        f"| one shared pass (evaluate now) | 1 | {med['shared']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in d['runs']['shared'])} |",
        f"| a pass per result (evaluate before) | 3 | {med['separate']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in d['runs']['separate'])} |",
        "",
        f"Outputs identical: {d['identical']} (top-1 {d['top1']:.2f}, NFR {d['nfr']:.2f}); "
        f"{med['separate'] / med['shared']:.2f}x.",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="abcde", help="which parts to run, e.g. 'a' or 'bc'")
    ap.add_argument("--n", type=int, default=50_000, help="size of part (a)")
    ap.add_argument("--n-small", type=int, default=10_000, help="size of part (b)")
    ap.add_argument("--knn-sizes", type=int, nargs="*", default=[10_000, 50_000], help="sizes of part (c)")
    ap.add_argument("--n-case", type=int, default=20_000, help="size of part (d)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child-full", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_full:
        child_full_eval(args.child_full)
        return

    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
           f"{platform.processor() or platform.machine()}, load average at start "
           f"{os.getloadavg()[0]:.2f}")
    results: dict[str, Any] = {"env": env}
    lines = ["Command: `" + " ".join(["python", "benchmarks/bench_eval.py", *sys.argv[1:]]) + "`", ""]
    body: list[str] = []
    if "a" in args.parts:
        results["a"] = [run_child(args.n) for _ in range(args.repeats)]
        body += report_a(results["a"], args.n)
    if "b" in args.parts:
        results["b"] = fast_vs_naive(args.n_small, args.repeats, args.naive_repeats)
        body += report_b(results["b"])
    if "c" in args.parts:
        results["c"] = [knn_backends(n, args.repeats) for n in args.knn_sizes]
        body += report_c(results["c"])
    if "d" in args.parts:
        results["d"] = case_passes(args.n_case, args.repeats)
        body += report_d(results["d"])
    if "e" in args.parts:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results["e"] = eval_process_vs_bare(args.n, args.repeats, Path(tmp))
        body += report_e(results["e"])
    results["load_average_at_end"] = os.getloadavg()[0]
    lines += [f"Environment: {env}; at end {results['load_average_at_end']:.2f}.", "", *body]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
