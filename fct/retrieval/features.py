"""Feature extraction for evaluation, in one process or under DDP.

Under DDP each rank embeds its shard of a ``DistributedSampler`` (no shuffle, no drop); features
travel with their dataset indices, so the sampler's padding duplicates are dropped by index
and every rank ends up with the full (N, D) matrix in dataset order.

A webdataset stream (no random access) is read shard by shard, each shard's samples held in memory
while it is embedded (``ShardSamples``) and split over the ranks like a map-style set; rows travel
with the samples' ids and come out in id order, which for shards written by ``prepare_dataset.py``
is the order of the source data set's split.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm import tqdm

from fct import dist
from fct.errors import UserError


class _WithIndex(Dataset):
    """Items (image, label, index) of a dataset of (image, label); keeps batched fetching."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        image, label = self.dataset[i]
        return image, label, i

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any, int]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(list(indices)) if fetch is not None else [self.dataset[i] for i in indices]
        return [(image, label, i) for (image, label), i in zip(items, indices)]


def _embedding(out: Any) -> torch.Tensor:
    """(N, D) from a BackboneOutput-like result (``.embedding``) or a plain tensor
    (TorchScript side-information models return (N, D, 1, 1))."""
    emb = getattr(out, "embedding", out)
    if not isinstance(emb, torch.Tensor):
        raise UserError(
            f"the model returned {type(out).__name__}; expected a tensor or an object with an "
            "'embedding' tensor"
        )
    return emb.flatten(1)


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of ``dataset`` (items: (image, label)).

    Returns features float32 (N, D) and labels int64 (N,), on the CPU, in dataset order, on
    every rank. The model runs in eval mode under ``torch.inference_mode`` (its previous
    mode is restored), with autocast to ``amp_dtype`` on CUDA when given. ``gather=False``: this
    process embeds all of ``dataset`` alone (no sharding over processes, no collective): for a
    caller that hands each process its own slice.
    """
    feats, labels, _ = _extract(
        model, lambda m, x: (_embedding(m(x)), None), dataset, batch_size=batch_size,
        num_workers=num_workers, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
        progress=progress, gather=gather,
    )
    return feats, labels


def extract_features_and_uncertainty(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`extract_features` for a model with ``embed_with_uncertainty(x) -> (feature,
    log_variance)`` (a transformed old model with a FastFill head); also returns the
    log-variances float32 (N, sigma_dim)."""
    embed = getattr(model, "embed_with_uncertainty", None)
    if embed is None:
        raise UserError(f"{type(model).__name__} predicts no uncertainty (no embed_with_uncertainty)")

    def fn(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f, lv = m.embed_with_uncertainty(x)  # type: ignore[operator]
        if lv is None:
            raise UserError(f"{type(m).__name__} returned no uncertainty: its transformation has no sigma head")
        return f.flatten(1), lv.flatten(1)

    feats, labels, lv = _extract(
        model, fn, dataset, batch_size=batch_size, num_workers=num_workers, device=device,
        amp_dtype=amp_dtype, channels_last=channels_last, progress=progress, gather=gather,
    )
    assert lv is not None
    return feats, labels, lv


def _extract(
    model: nn.Module,
    fn: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    progress: bool,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The shared loop: fn(model, images) -> (features (B, D), extra (B, E) or None)."""
    shared = gather and dist.is_dist()
    device = torch.device(device)
    parts, n, by_id = _parts(dataset)
    if n == 0:
        raise UserError("cannot extract features from an empty dataset")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # its forward would sync buffers: pointless for inference
    use_amp = amp_dtype is not None and device.type == "cuda"
    autocast = (
        torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    )
    feats, extras, labels, indices = [], [], [], []
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="features", unit="img", disable=dist.progress_disabled(progress))
    try:
        with torch.inference_mode(), autocast:
            for load in parts:
                part, keys = load()
                indexed = _WithIndex(part)
                sampler = DistributedSampler(indexed, shuffle=False, drop_last=False) if shared else None
                loader = DataLoader(indexed, batch_size=batch_size, shuffle=False, sampler=sampler,
                                    num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False)
                for images, y, idx in loader:
                    images = images.to(device, non_blocking=True)
                    if channels_last and images.dim() == 4:
                        images = images.contiguous(memory_format=torch.channels_last)
                    f, extra = fn(model, images)
                    feats.append(f.float())
                    if extra is not None:
                        extras.append(extra.float())
                    labels.append(torch.as_tensor(y, dtype=torch.int64))
                    idx = torch.as_tensor(idx, dtype=torch.int64)
                    indices.append(idx if keys is None else torch.from_numpy(keys)[idx])
                    bar.update(len(idx) * (dist.world_size() if shared else 1))
    finally:
        bar.close()
        model.train(was_training)

    f = torch.cat(feats)
    width = f.shape[1]
    if extras:
        f = torch.cat([f, torch.cat(extras)], dim=1)  # travel together through the gather
    y = torch.cat(labels).to(f.device)
    i = torch.cat(indices).to(f.device)
    if shared:
        # Gather on the features' device (NCCL needs CUDA tensors), then dedupe by index.
        f, y, i = (dist.all_gather_variable(t) for t in (f, y, i))
    f, y = _place_by_index(f.cpu(), y.cpu(), i.cpu(), n, by_id)
    if extras:
        return f[:, :width].contiguous(), y, f[:, width:].contiguous()
    return f, y, None


def _parts(dataset: Dataset) -> tuple[list[Callable[[], tuple[Dataset, Any]]], int, bool]:
    """(loaders of the map-style parts to embed in turn, total rows, whether rows are keyed by id):
    a map-style set is one part keyed by index (keys None); a webdataset stream one part per
    non-empty shard, keyed by the samples' ids."""
    if not isinstance(dataset, IterableDataset):
        return [lambda: (dataset, None)], len(dataset), False  # type: ignore[arg-type]
    from fct.data.webdataset import NO_RANDOM_ACCESS, ShardStream, shard_parts

    if not isinstance(dataset, ShardStream):
        raise UserError(NO_RANDOM_ACCESS)
    parts = shard_parts(dataset)
    return [load for _, load in parts], sum(c for c, _ in parts), True


def _place_by_index(
    feats: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, n: int, by_id: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (M, D) tagged with dataset indices (M,), M >= n with repeats -> (n, D) in index
    order. Of repeated indices (sampler padding) the first in gathered order is kept. With
    ``by_id`` the tags are sample ids (n distinct values, any range) instead of 0..n-1."""
    order = torch.sort(idx, stable=True).indices
    sorted_idx = idx[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    keep = order[first]
    if keep.numel() != n or not (by_id or torch.equal(idx[keep], torch.arange(n))):
        hint = " (are the shards' sample ids unique?)" if by_id else ""
        raise RuntimeError(f"feature gathering lost items: {keep.numel()} distinct indices for {n} items{hint}")
    return feats[keep].contiguous(), labels[keep].contiguous()
