#!/usr/bin/env python
"""Training throughput (images/s) of each CIFAR-style backbone, and what limits it.

For each architecture, side by side in one run:
  compute  - forward+backward+SGD step on a fixed batch already in memory (the model's ceiling),
  pipeline - the real training loader (seeded augmentation, workers) feeding the same step,
  loader   - the loader alone.
When pipeline ~ compute, training is compute-bound; when pipeline ~ loader, data-bound.
Runs on CUDA when available (bf16 autocast), else on the CPU (fp32). Data: the shared
Tiny-ImageNet stand-in when present, else random 32x32 uint8 images.

    python benchmarks/bench_train.py [--archs CifarResNet20,CifarResNet56] [--steps 20] [--batch 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fct.config import RuntimeParams  # noqa: E402
from fct.data import build_dataset  # noqa: E402
from fct.experiments.recipe import TINY_IMAGENET  # noqa: E402
from fct.models import build_backbone  # noqa: E402
from fct.report import format_table  # noqa: E402
from fct.runtime import make_runtime  # noqa: E402
from fct.training.loaders import train_loader  # noqa: E402

SHARED = TINY_IMAGENET


def data_root() -> str:
    if (SHARED / "train.npz").exists():
        return str(SHARED)
    d = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for split, n in (("train", 5000), ("val", 500)):
        np.savez(d / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 100, n).astype(np.int64))
    return str(d)


def timed_steps(step, batches, warmup: int, steps: int) -> float:
    """Median seconds per step over ``steps`` steps after ``warmup``."""
    times = []
    it = iter(batches)
    for i in range(warmup + steps):
        x, y = next(it)
        t = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="CifarResNet20,CifarResNet32,CifarResNet56,CifarResNet18,CifarResNet50")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    rt = make_runtime(RuntimeParams(progress=False))
    root = data_root()
    ds = build_dataset("npz", root, "train", augment=True)
    loader, sampler = train_loader(ds, global_batch=args.batch, num_workers=args.workers, seed=0,
                                   pin_memory=rt.device.type == "cuda")
    sampler.set_epoch(0)

    def loader_only() -> float:
        it = iter(loader)
        next(it)
        t = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            x, _y = next(it)
            n += x.shape[0]
        return n / (time.perf_counter() - t)

    loader_ips = loader_only()
    rows = []
    for arch in args.archs.split(","):
        for cl in (False, True):
            torch.manual_seed(0)
            model = build_backbone(arch, num_classes=100, embedding_dim=128, last_nonlin=True)
            rt.channels_last = cl
            model = rt.prepare_model(model).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(x, y):
                x, y = rt.to_input(x), y.to(rt.device)
                with rt.autocast():
                    loss = nn.functional.cross_entropy(model(x).logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()

            fixed = next(iter(loader))
            compute = args.batch / timed_steps(step, iter(lambda: fixed, None), 2, args.steps)
            t = time.perf_counter()
            it = iter(loader)
            n = 0
            for i in range(args.steps + 2):
                if i == 2:
                    t, n = time.perf_counter(), 0
                x, y = next(it)
                step(x, y)
                n += x.shape[0]
            pipeline = n / (time.perf_counter() - t)
            bound = "data" if pipeline < 0.8 * compute and loader_ips < 1.5 * pipeline else "compute"
            rows.append([arch, "channels_last" if cl else "contiguous", round(compute), round(pipeline), bound])
            print(rows[-1], flush=True)
    dev = torch.cuda.get_device_name() if rt.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\ndevice: {dev}; batch {args.batch}; loader alone: {loader_ips:.0f} img/s with {args.workers} workers")
    print(format_table(["arch", "memory format", "compute img/s", "pipeline img/s", "limited by"], rows))


if __name__ == "__main__":
    main()
