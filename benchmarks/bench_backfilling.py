#!/usr/bin/env python
"""Backfilling curves: the one-pass evaluation against re-running a full evaluation per point.

Side by side in one process on the same data (N clustered 128-d embeddings, 100 classes, a noisy
"h(old)" copy of the new gallery, leave-one-out, l2, top-1/top-5/full mAP):
  one pass  - ``backfilling_curves``: per chunk of queries two key blocks (new, h(old)), every point
              of every ordering derived from them,
  per point - ``retrieval_metrics`` on the mixed gallery of each point (what a loop over the
              reference's points does), for one ordering.
Both give the same numbers (checked); reported: seconds per ordering and the ratio.

    python benchmarks/bench_backfilling.py [--n 5000] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fct.report import format_table  # noqa: E402
from fct.retrieval import retrieval_metrics  # noqa: E402
from fct.retrieval.backfilling import backfilling_curves, curve_points  # noqa: E402


def data(n: int, dim: int = 128, classes: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) / dim**0.5
    labels = torch.arange(n) % classes
    new = centres[labels] + 2.0 * torch.randn(n, dim, generator=g) / dim**0.5
    old = new + 1.5 * torch.randn(n, dim, generator=g) / dim**0.5
    return new, old, labels, torch.randperm(n, generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    new, old, labels, perm = data(args.n)
    one, naive = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        curve = backfilling_curves(new, labels, new, old, labels, {"random": [perm]}, steps=args.steps,
                                   exclude_self=True)["random"]
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        points = []
        for upto in curve_points(args.n, args.steps):
            mixed = old.clone()
            mixed[perm[:upto]] = new[perm[:upto]]
            points.append(retrieval_metrics(new, labels, mixed, labels, exclude_self=True))
        naive.append(time.perf_counter() - t0)
    worst = max(abs(curve.values[m][0, i] - pt[m]) for i, pt in enumerate(points) for m in ("top1", "top5", "mAP"))
    a, b = statistics.median(one), statistics.median(naive)
    print(f"N={args.n}, {args.steps + 2} points, one ordering; medians of {args.repeats}; "
          f"largest metric difference {worst:.2e}")
    print(format_table(["path", "seconds (median)", "runs", "speed-up"],
                       [["one pass (backfilling_curves)", a, ", ".join(f"{x:.2f}" for x in one), b / a],
                        ["full evaluation per point", b, ", ".join(f"{x:.2f}" for x in naive), 1.0]]))


if __name__ == "__main__":
    main()
