"""Features of frozen models, computed once per augmented view and memory-mapped on disk.

One cache folder per model (named by a hash of that model file's contents, the data and the
seed), so a run that adds a model (e.g. side-information) reuses the features of the others:
``features.npy`` of shape (views, N, D), ``labels.npy`` (N,), ``key.json`` and ``view_<v>.done``
markers. A view is marked done only after every process wrote its shard and the arrays were
flushed, so an interrupted build resumes at the first unfinished view and never serves a
half-written one. The models still missing a view are run together in one pass over the data.

Stored embeddings (features files that teams wrote with their own models) become a one-view
cache in memory (:func:`stored_feature_cache`), so training on them runs the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from tqdm import tqdm

from fct import dist
from fct.errors import UserError
from fct.io import atomic_write_json, atomic_write_text, file_sha256
from fct.runtime import Runtime
from fct.training.loaders import SeededDataset


# sha256 of a model file's contents: a retrained model never reuses stale features.
file_digest = file_sha256


class _ViewShard(Sampler):
    """(view, index) keys of this process's shard, in index order, without padding."""

    def __init__(self, n: int, view: int) -> None:
        self.indices = list(range(dist.rank(), n, dist.world_size()))
        self.view = view

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.view, i) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class FeatureCache:
    roots: dict[str, Path]  # name -> the model's cache folder
    arrays: dict[str, np.ndarray]  # name -> (views, N, D) memory map
    labels: np.ndarray  # (N,)

    @property
    def views(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def describe(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.roots.items())

    def view(self, v: int, device: torch.device) -> dict[str, torch.Tensor]:
        """All features of view ``v`` as tensors on ``device`` (read once per epoch)."""
        return {k: torch.from_numpy(np.array(a[v])).to(device) for k, a in self.arrays.items()}


def stored_feature_cache(features: dict[str, np.ndarray], labels: np.ndarray,
                         sources: dict[str, str]) -> FeatureCache:
    """A one-view cache of stored embeddings: ``features`` name -> (N, D_name) rows of the same
    images in one order, ``labels`` (N,), ``sources`` name -> the file each came from."""
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32)[None] for k, v in features.items()}
    return FeatureCache(roots={k: Path(p) for k, p in sources.items()}, arrays=arrays,
                        labels=np.asarray(labels, dtype=np.int64))


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "embedding", out).flatten(1).float()


@torch.no_grad()  # not inference_mode: on-the-fly features feed h's autograd graph
def embed_batch(models: dict[str, nn.Module], images: torch.Tensor, rt: Runtime) -> dict[str, torch.Tensor]:
    """Each frozen model's embedding (B, D_name) of one batch of images."""
    x = rt.to_input(images)
    with rt.autocast():
        return {name: _embed(m, x) for name, m in models.items()}


def build_feature_cache(
    models: dict[str, nn.Module],
    dataset: Dataset,
    *,
    views: int,
    seed: int,
    cache_dir: str | os.PathLike,
    key: dict,
    rt: Runtime,
    batch_size: int,
    num_workers: int,
    augment_seeded: bool = True,
) -> FeatureCache:
    """Compute (or reuse) ``views`` augmented passes of ``dataset`` through the frozen ``models``.

    key: ``{"models": {name: digest of the model file}, ...}`` plus what else identifies the
    features (data set, classes, code version); each model's folder is keyed by its own digest
    and the rest. augment_seeded: view v of sample i uses the augmentation of training epoch v
    (the SeededDataset convention); False for an un-augmented split (views must be 1).
    """
    if isinstance(dataset, IterableDataset):  # a webdataset stream: features are stored by index
        raise UserError("feature_cache.enabled=true needs a map-style data set; with dataset_params.name="
                        "webdataset set feature_cache.enabled=false (features computed as the stream is read)")
    n = len(dataset)  # type: ignore[arg-type]
    shared = {k: v for k, v in key.items() if k != "models"}
    roots: dict[str, Path] = {}
    for name in models:
        full_key = {**shared, "model": key["models"][name], "seed": seed, "n": n,
                    "augment_seeded": augment_seeded, "format": 2}
        digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:20]
        roots[name] = Path(cache_dir) / digest
    probe = dataset[0][0][None] if not augment_seeded else SeededDataset(dataset, seed)[(0, 0)][0][None]
    dims = {k: int(v.shape[1]) for k, v in embed_batch(models, probe, rt).items()}
    if dist.is_main():
        labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = np.array([int(dataset[i][1]) for i in range(n)], dtype=np.int64)
        for name, d in dims.items():
            root = roots[name]
            root.mkdir(parents=True, exist_ok=True)
            path = root / "features.npy"
            ok = False
            if path.exists():
                try:
                    ok = np.load(path, mmap_mode="r").shape[0] >= views
                except ValueError:
                    ok = False
            if not ok:  # created (or grown to more views): earlier views are recomputed
                for marker in root.glob("view_*.done"):
                    marker.unlink()
                np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(views, n, d)).flush()
                np.save(root / "labels.npy", np.asarray(labels, dtype=np.int64))
                atomic_write_json({**shared, "model": key["models"][name], "seed": seed, "n": n}, root / "key.json")
    dist.barrier()
    arrays = {name: np.load(roots[name] / "features.npy", mmap_mode="r+") for name in dims}
    source = SeededDataset(dataset, seed) if augment_seeded else dataset
    for v in range(views):
        todo = [name for name in models if not (roots[name] / f"view_{v}.done").exists()]
        if not todo:
            continue
        sampler = _ViewShard(n, v) if augment_seeded else list(range(dist.rank(), n, dist.world_size()))
        loader = DataLoader(source, batch_size=batch_size, sampler=sampler, num_workers=num_workers,  # type: ignore[arg-type]
                            pin_memory=rt.device.type == "cuda")
        pos = 0
        mine = np.arange(dist.rank(), n, dist.world_size())
        running = {name: models[name] for name in todo}
        for images, _labels in tqdm(loader, desc=f"caching features ({', '.join(todo)}), view {v + 1}/{views}",
                                    leave=False, dynamic_ncols=True,
                                    disable=dist.progress_disabled(rt.params.progress)):
            feats = embed_batch(running, images, rt)
            idx = mine[pos: pos + images.shape[0]]
            pos += images.shape[0]
            for name, f in feats.items():
                arrays[name][v, idx] = f.cpu().numpy()
        for name in todo:
            arrays[name].flush()
        dist.barrier()
        if dist.is_main():
            for name in todo:
                atomic_write_text("", roots[name] / f"view_{v}.done")
    dist.barrier()
    readonly = {name: np.load(roots[name] / "features.npy", mmap_mode="r")[:views] for name in dims}
    first = next(iter(roots.values()))
    return FeatureCache(roots=roots, arrays=readonly, labels=np.load(first / "labels.npy"))


class CachedBatches:
    """Mini-batches of cached features in the order of the on-the-fly training loader.

    Epoch e reads view e mod V and visits samples in DistributedSampler(seed).set_epoch(e) order,
    the same order (and, for e < V, the same augmented inputs) as an on-the-fly epoch.
    """

    def __init__(self, cache: FeatureCache, *, batch_size: int, seed: int, device: torch.device) -> None:
        self.cache = cache
        self.batch_size = batch_size
        self.device = device
        self.sampler = DistributedSampler(
            range(len(cache.labels)), num_replicas=dist.world_size(), rank=dist.rank(),  # type: ignore[arg-type]
            shuffle=True, seed=seed, drop_last=True,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        feats = self.cache.view(self.epoch % self.cache.views, self.device)
        labels = torch.from_numpy(self.cache.labels).to(self.device)
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            yield {k: v[idx] for k, v in feats.items()}, labels[idx]

