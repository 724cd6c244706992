"""Data loaders whose randomness depends only on (seed, epoch, sample index).

Each training sample's augmentation is drawn from a generator seeded with (seed, epoch, index),
and the shuffling from ``DistributedSampler(seed).set_epoch(epoch)`` (also used with one process).
So a run gives the same batches whatever the number of data-loader workers, a resumed run
repeats the epochs it would have run, and with W processes the union of the W per-process batches
of step t is the single-process batch t (DistributedSampler deals indices round-robin).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sized

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fct import dist
from fct.errors import ConfigError

_MIX = 0x9E3779B97F4A7C15  # odd constant for mixing (seed, epoch, index) into one seed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + index) % (2**63 - 1)


class SeededDataset(Dataset):
    """Wraps a dataset; items are requested as (epoch, index) and augmented under a fixed seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # The transforms draw from torch's global CPU generator; reseeding it here (in the worker
        # process, or in the main process with num_workers=0) makes each augmentation a pure
        # function of (seed, epoch, index). Only the CPU generator: torch.manual_seed would also
        # reseed every CUDA device, far slower per call.
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


class EpochTaggedSampler(Sampler):
    """Yields (epoch, index) from a DistributedSampler; ``set_epoch`` sets both."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, no padding: each sample is seen exactly once over
    all processes (for metrics that are summed across processes)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_global_batch(global_batch: int) -> None:
    """Refuse a global batch that the processes torchrun started cannot share evenly. Called
    before the process group starts, so every rank stops at once with exit code 2 (torchrun then
    reports the exit code; only rank 0 prints the line)."""
    w = dist.planned_world_size()
    if global_batch % w != 0:
        raise ConfigError(
            f"dataset_params.batch_size={global_batch} (the global batch) is not divisible by the "
            f"{w} processes"
        )


def per_process_batch(global_batch: int) -> int:
    w = dist.world_size()
    if global_batch % w != 0:
        raise ConfigError(
            f"dataset_params.batch_size={global_batch} (the global batch) is not divisible by the "
            f"{w} processes"
        )
    return global_batch // w


def _loader_kwargs(num_workers: int, pin: bool) -> dict:
    kw: dict = {"num_workers": num_workers, "pin_memory": pin}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return kw


def train_loader(
    dataset: Sized, *, global_batch: int, num_workers: int, seed: int, pin_memory: bool,
    collate_fn: Optional[Callable[[list], Any]] = None,
) -> tuple[DataLoader, EpochTaggedSampler]:
    """Shuffled, seeded, sharded training loader; drops the last partial batch.

    collate_fn: None for the default collation (e.g. ``fct.ssl.two_view_collate`` for pairs of views)."""
    batch = per_process_batch(global_batch)
    if batch > len(dataset):
        raise ConfigError(
            f"dataset_params.batch_size={global_batch} is larger than the {len(dataset)} training samples"
        )
    sampler = EpochTaggedSampler(
        DistributedSampler(
            dataset,  # type: ignore[arg-type]
            num_replicas=dist.world_size(),
            rank=dist.rank(),
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
    )
    loader = DataLoader(
        SeededDataset(dataset, seed),  # type: ignore[arg-type]
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
        **_loader_kwargs(num_workers, pin_memory),
    )
    return loader, sampler


def eval_loader(dataset: Sized, *, global_batch: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """This process's shard of ``dataset`` in order, without padding."""
    batch = max(1, global_batch // dist.world_size())
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch,
        sampler=ShardSampler(len(dataset), dist.rank(), dist.world_size()),
        **{**_loader_kwargs(num_workers, pin_memory), "persistent_workers": False},
    )
