"""Data loaders whose randomness depends only on (seed, epoch, sample index).

Each training sample's augmentation is drawn from a generator seeded with (seed, epoch, index),
and the shuffling from ``DistributedSampler(seed).set_epoch(epoch)`` (also used with one process).
So a run gives the same batches whatever the number of data-loader workers, a resumed run
repeats the epochs it would have run, and with W processes the union of the W per-process batches
of step t is the single-process batch t (DistributedSampler deals indices round-robin).

Streamed data sets (``webdataset``: a :class:`fct.data.webdataset.ShardStream`) go through
:class:`StreamBatches` instead: each epoch every process reads ``N // W`` samples from shards dealt
by (seed, epoch) (``fct.data.webdataset.epoch_segments``), its loader workers read disjoint shard
segments, and the per-worker batches are regrouped in the main process into ``(N // W) // B``
full batches per process, so all processes take the same number of steps. Each sample's
augmentation is still a function of (seed, epoch, sample id); the order within an epoch also
depends on the number of workers and the shuffle buffer, but not on anything else, so a run
resumed at an epoch boundary repeats the epochs it would have run. Checkpoints are written at
epoch ends: a run stopped mid-epoch restarts that epoch from its first batch, for streams too.
"""

from __future__ import annotations

import multiprocessing
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sized, Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

from fct import dist
from fct.data.webdataset import ShardStream
from fct.errors import ConfigError, RunError, UserError

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
) -> Union[tuple[DataLoader, EpochTaggedSampler], tuple["StreamBatches", "StreamBatches"]]:
    """Shuffled, seeded, sharded training loader; drops the last partial batch.

    Returns (batches, what ``set_epoch`` is called on); for a streamed data set both are one
    :class:`StreamBatches`.
    collate_fn: None for the default collation (e.g. ``fct.ssl.two_view_collate`` for pairs of views)."""
    batch = per_process_batch(global_batch)
    if isinstance(dataset, ShardStream):
        stream = StreamBatches(dataset, batch=batch, num_workers=num_workers, seed=seed, pin_memory=pin_memory,
                               collate_fn=collate_fn or default_collate)
        return stream, stream
    if isinstance(dataset, IterableDataset):
        raise UserError(f"{type(dataset).__name__} is a stream fct cannot shard; use a registered data set")
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
    """This process's shard of ``dataset`` in order, without padding (a stream: this process's
    shards, each sample once; the batches of different workers interleave)."""
    batch = max(1, global_batch // dist.world_size())
    if isinstance(dataset, ShardStream):
        return DataLoader(dataset.for_process(dist.rank(), dist.world_size()), batch_size=batch,
                          **{**_loader_kwargs(num_workers, pin_memory), "persistent_workers": False})
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch,
        sampler=ShardSampler(len(dataset), dist.rank(), dist.world_size()),
        **{**_loader_kwargs(num_workers, pin_memory), "persistent_workers": False},
    )


# --------------------------------------------------------------------------- streams
class _EpochStream(IterableDataset):
    """What each loader worker iterates: its training batches of the current epoch. The epoch is
    shared memory, so persistent workers see ``set_epoch`` of the main process (a worker reads it
    when the next epoch's iteration starts, after ``set_epoch``)."""

    def __init__(self, stream: ShardStream, *, batch: int, seed: int, rank: int, world: int,
                 collate_fn: Callable[[list], Any]) -> None:
        self.stream, self.batch, self.seed = stream, batch, seed
        self.rank, self.world, self.collate_fn = rank, world, collate_fn
        self.epoch = multiprocessing.get_context().RawValue("q", 0)

    def __iter__(self) -> Iterator[Any]:
        return self.stream.train_batches(seed=self.seed, epoch=int(self.epoch.value), rank=self.rank,
                                         world=self.world, batch=self.batch, seed_of=partial(sample_seed, self.seed),
                                         collate=self.collate_fn)


def _batch_size(batch: Any) -> int:
    """Samples in a collated batch (tensors, or tuples / lists of them, first dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    raise TypeError(f"cannot size a batch of type {type(batch).__name__}")


def _cat(batches: list) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([b[i] for b in batches]) for i in range(len(first)))
    raise TypeError(f"cannot join batches of type {type(first).__name__}")


def _slice(batch: Any, a: int, b: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[a:b]
    return type(batch)(_slice(x, a, b) for x in batch)


class StreamBatches:
    """Training batches of a :class:`ShardStream`, epoch by epoch (``fct.training.loop.Epochs``).

    Every process yields ``len(self)`` = (N // W) // B full batches of B per epoch (N samples, W
    processes, B per-process batch): the workers' last, partial batches are joined in the main
    process and the final remainder (< B samples) is left out, as ``drop_last`` does.
    """

    def __init__(self, stream: ShardStream, *, batch: int, num_workers: int, seed: int, pin_memory: bool,
                 collate_fn: Callable[[list], Any]) -> None:
        world = dist.world_size()
        per_rank = stream.total // world
        self.batch = batch
        self.steps = per_rank // batch
        if self.steps < 1:
            raise ConfigError(
                f"dataset_params.batch_size={batch * world} is larger than the {stream.total} training samples "
                f"shared by {world} process{'es' if world > 1 else ''}"
            )
        self.source = _EpochStream(stream, batch=batch, seed=seed, rank=dist.rank(), world=world,
                                   collate_fn=collate_fn)
        self.loader = DataLoader(self.source, batch_size=None, **_loader_kwargs(num_workers, pin_memory))

    def set_epoch(self, epoch: int) -> None:
        self.source.epoch.value = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        b, done = self.batch, 0
        pending: list = []
        held = 0
        try:
            for part in self.loader:
                n = _batch_size(part)
                if n == b:
                    ready = [part]
                else:  # a worker's last batch: join with the others
                    pending.append(part)
                    held += n
                    ready = []
                    if held >= b:
                        joined = _cat(pending)
                        ready = [_slice(joined, i, i + b) for i in range(0, held - b + 1, b)]
                        rest = held % b
                        pending, held = ([_slice(joined, held - rest, held)] if rest else []), rest
                for full in ready:
                    if done < self.steps:
                        done += 1
                        yield full
        except UserError as e:  # raised in a worker: the DataLoader re-raises it with a traceback
            raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
        if done < self.steps:
            raise RunError(f"the shards gave {done} batches of {b} this epoch instead of {self.steps}; "
                           "do the shards hold what their index says?")
