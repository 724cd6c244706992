"""The one distributed module: DDP detected from the ``torchrun`` environment.

Outside ``torchrun`` every helper behaves as a single process (rank 0 of 1), so the same
script runs with one process or many. Backend: NCCL when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def planned_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), known before ``init``."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def planned_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), known before ``init``."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def init(device_kind: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun; return this process's device.

    device_kind: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
    """
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if use_cuda:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            **({"device_id": device} if use_cuda else {}),
        )
    return device


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes (in place) and return it."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_for_all(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; an exception it raises is raised on every rank.

    For checks of shared state (the run folder, its lock): without this, the other ranks would
    wait at the next collective for a rank 0 that has stopped. On ranks other than 0 the
    exception is marked ``reported_by_main`` so that only rank 0 prints it."""
    error: Optional[BaseException] = None
    if is_main():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if is_dist():
        error = broadcast_object(error)  # type: ignore[assignment]
        if error is not None and not is_main():
            error.reported_by_main = True  # type: ignore[attr-defined]
    if error is not None:
        raise error


def all_gather_variable(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 tensors whose first dimension differs across processes.

    (n_r, ...) on each rank -> (sum_r n_r, ...) on every rank, in rank order.
    """
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    biggest = max(sizes_i)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)], dim=0)


def progress_disabled(enabled: bool) -> bool | None:
    """tqdm's ``disable`` argument: bars on rank 0 only, when enabled, and only on a terminal
    (None lets tqdm hide them when output goes to a log file)."""
    return None if enabled and is_main() else True
