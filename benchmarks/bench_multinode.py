#!/usr/bin/env python
"""Two-"node" against one-process training time: ``train_backbone.py`` on the digits config.

Runs the same config (CifarResNet20 on scikit-learn's digits, global batch 64) four ways, each a
fresh run folder, and prints wall times (launch to exit: interpreter start, rendezvous, data,
training, validation, checkpoints) and training times (the sum of the epochs' ``epoch_time_s``
in ``metrics.jsonl``, i.e. the optimisation steps alone):

  one process, 1 thread     python train_backbone.py            (OMP_NUM_THREADS=1)
  one process, 2 threads    python train_backbone.py            (OMP_NUM_THREADS=2)
  one node, 2 processes     torchrun --standalone --nproc_per_node 2   (1 thread each)
  two nodes x 1 process     two torchrun launches, --nnodes 2, c10d rendezvous on 127.0.0.1
                            (1 thread each): the multi-node path, on one machine

Each way is run ``--repeats`` times, interleaved; medians are printed, with the ratio of each to
the one-process, 1-thread run.

    python benchmarks/bench_multinode.py [--epochs 15] [--repeats 3] [--num-classes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fct.config.samples import digits_backbone_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(way: str, config: Path) -> tuple[list[list[str]], str]:
    """The command lines of one way (one per "node") and the OMP_NUM_THREADS each gets."""
    script = ["train_backbone.py", "--config", str(config)]
    run = [sys.executable, "-m", "torch.distributed.run"]
    if way == "one process, 1 thread":
        return [[sys.executable, *script]], "1"
    if way == "one process, 2 threads":
        return [[sys.executable, *script]], "2"
    if way == "one node, 2 processes":
        return [[*run, "--standalone", "--nproc_per_node", "2", *script]], "1"
    port, rdzv_id = free_port(), uuid.uuid4().hex[:12]
    return [[*run, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id, *script] for r in (0, 1)], "1"


WAYS = ("one process, 1 thread", "one process, 2 threads", "one node, 2 processes", "two nodes x 1 process")


def run_way(way: str, folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(wall seconds, training seconds) of one fresh run."""
    config = digits_backbone_config(folder, epochs=args.epochs, num_classes=args.num_classes,
                                    batch=args.batch)
    cmds, threads = commands(way, config)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads}
    logs = [folder / f"node{i}.err" for i in range(len(cmds))]
    t0 = time.perf_counter()
    procs = []
    for c, log in zip(cmds, logs):
        with open(log, "w") as err:
            procs.append(subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        for p in procs:
            p.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.terminate()  # torchrun's agent stops its workers on SIGTERM
        sys.exit(f"{way} took longer than {args.timeout} s")
    wall = time.perf_counter() - t0
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            sys.exit(f"{way} failed (exit {p.returncode}):\n{log.read_text()[-2000:]}")
    lines = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return wall, sum(x["epoch_time_s"] for x in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10, help="digits classes trained on (10: 1438 images)")
    p.add_argument("--batch", type=int, default=64, help="the global batch")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed to one run")
    args = p.parse_args()
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for j, way in enumerate(WAYS):
                results[way].append(run_way(way, Path(tmp) / f"{i}_{j}", args))
                wall, train = results[way][-1]
                print(f"repeat {i + 1}/{args.repeats}  {way:<24} wall {wall:6.1f} s  training {train:6.1f} s",
                      flush=True)
    base_wall = statistics.median(w for w, _ in results[WAYS[0]])
    base_train = statistics.median(t for _, t in results[WAYS[0]])
    print(f"\nCifarResNet20, digits ({args.num_classes} classes), global batch {args.batch}, "
          f"{args.epochs} epochs; medians of {args.repeats}")
    print("| way | wall s | training s | wall / one process | training / one process |")
    print("| --- | --- | --- | --- | --- |")
    for way in WAYS:
        wall = statistics.median(w for w, _ in results[way])
        train = statistics.median(t for _, t in results[way])
        print(f"| {way} | {wall:.1f} | {train:.1f} | {wall / base_wall:.2f} | {train / base_train:.2f} |")


if __name__ == "__main__":
    main()
