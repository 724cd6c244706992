#!/usr/bin/env python
"""Training-loader throughput (images/s): WebDataset shards against the npz arrays, side by side.

The same images (the Tiny-ImageNet stand-in when present, else random 32x32 uint8 images) are
written as shards by ``prepare_dataset``'s WebDataset writer into a temporary folder, then both
training loaders (``fct.training.loaders.train_loader``: seeded augmentation, workers, the
per-process batch) are timed over the same number of batches, alternating npz and WebDataset in
each repeat so that the noise of a shared machine hits both alike. Reported: the median, min and
max images/s of each, and the WebDataset / npz ratio of the medians; also how long writing the
shards took and their size.

    python benchmarks/bench_loader.py [--batch 128] [--workers 0,2] [--batches 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fct.config.common import DatasetParams  # noqa: E402
from fct.data import build_dataset  # noqa: E402
from fct.data.prepare import prepare_webdataset  # noqa: E402
from fct.experiments.recipe import TINY_IMAGENET  # noqa: E402
from fct.report import format_table  # noqa: E402
from fct.training.loaders import train_loader  # noqa: E402


def npz_root(scratch: Path) -> Path:
    if (TINY_IMAGENET / "train.npz").exists():
        return TINY_IMAGENET
    rng = np.random.default_rng(0)
    for split, n in (("train", 20000), ("val", 1000)):
        np.savez(scratch / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 100, n).astype(np.int64))
    return scratch


def images_per_s(dataset, *, batch: int, workers: int, batches: int, epoch: int, warmup: int = 3) -> float:
    """Images/s of a fresh training loader over ``batches`` batches after ``warmup`` (worker start-up,
    the first shard opened, the shuffle buffer filled)."""
    loader, sampler = train_loader(dataset, global_batch=batch, num_workers=workers, seed=0, pin_memory=False)
    sampler.set_epoch(epoch)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _y = next(it)
        n += x.shape[0]
    rate = n / (time.perf_counter() - t)
    del it, loader
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", default="0,2", help="loader worker counts to compare, comma-separated")
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--image-format", choices=["png", "npy"], default="png")
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        root = npz_root(scratch)
        shards = scratch / "wds"
        t = time.perf_counter()
        counts = prepare_webdataset("npz", root, shards, shard_size=args.shard_size, image_format=args.image_format)
        write_s = time.perf_counter() - t
        size_mb = sum(f.stat().st_size for f in shards.glob("train-*.tar")) / 2**20
        npz_mb = (root / "train.npz").stat().st_size / 2**20
        npz = build_dataset("npz", str(root), "train", augment=True)
        wds = build_dataset("webdataset", str(shards), "train", augment=True,
                            options=DatasetParams(name="webdataset", shuffle_buffer=args.shuffle_buffer))
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            rates: dict[str, list[float]] = {"npz": [], "webdataset": []}
            for r in range(args.repeats):
                order = ("npz", "webdataset") if r % 2 == 0 else ("webdataset", "npz")
                for kind in order:
                    ds = npz if kind == "npz" else wds
                    rates[kind].append(images_per_s(ds, batch=args.batch, workers=workers, batches=args.batches,
                                                    epoch=r))
                print(f"workers {workers}, repeat {r + 1}: npz {rates['npz'][-1]:.0f} img/s, "
                      f"webdataset {rates['webdataset'][-1]:.0f} img/s", flush=True)
            med = {k: statistics.median(v) for k, v in rates.items()}
            for kind in ("npz", "webdataset"):
                rows.append([workers, kind, round(med[kind]), round(min(rates[kind])), round(max(rates[kind])),
                             f"{med[kind] / med['npz']:.2f}"])
        print(f"\n{counts['train']} training images of {root}; {args.batch} per batch, {args.batches} batches "
              f"timed, {args.repeats} repeats; CPU ({os.cpu_count()} cores)")
        print(f"shards: {args.image_format}, {args.shard_size} per shard, {size_mb:.0f} MiB (train.npz {npz_mb:.0f} "
              f"MiB), written in {write_s:.1f} s; shuffle buffer {args.shuffle_buffer}")
        print(format_table(["workers", "loader", "median img/s", "min", "max", "ratio to npz"], rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
