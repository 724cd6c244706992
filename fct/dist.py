"""The one distributed module: DDP detected from the ``torchrun`` environment.

Outside ``torchrun`` every helper behaves as a single process (rank 0 of 1), so the same
script runs with one process or many, on one node or several (``torchrun --nnodes N`` with a
c10d rendezvous). Backend: NCCL when CUDA is available, gloo otherwise.

Every collective waits at most ``FCT_DIST_TIMEOUT_S`` seconds (default 1800) for the other
ranks. When one of them is gone (killed, crashed, its node lost) the collective fails on the
survivors; ``peer_failure`` turns that failure into a one-line ``RunError`` (``fct.cli.run_main``
prints it on every surviving rank), so a job stops with a reason instead of hanging.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from fct.errors import ConfigError, RunError

TIMEOUT_ENV = "FCT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own gloo default; far above any wait of a healthy run

# Fragments of the errors a collective raises when a peer is gone or silent: gloo's TCP transport
# ("Connection closed by peer", "Timed out waiting 60000ms for recv operation"), NCCL, the store.
_PEER_LOST = re.compile(
    r"closed by peer|reset by peer|broken pipe|timed out waiting|timeout caused pair closure|"
    r"socket timeout|gloo|nccl|connection refused",
    re.IGNORECASE,
)
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")  # "[.../pair.cc:545] " (C++)
_peer_lost = False  # set by peer_failure: the process group is broken, do not tear it down


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


def timeout() -> timedelta:
    """How long a collective waits for the other ranks before it fails: ``FCT_DIST_TIMEOUT_S``
    seconds (default 1800). The bound on how long the survivors of a silently lost node (no
    connection reset reaches them: a network partition, a frozen host) wait before they stop."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds > 0")
    return timedelta(seconds=seconds)


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
            timeout=timeout(),
            **({"device_id": device} if use_cuda else {}),
        )
    return device


def shutdown() -> None:
    """Tear the process group down, unless a peer was lost: then the process exits without it
    (destroying a group with a dead member can block under NCCL; the OS closes the sockets)."""
    if is_dist() and not _peer_lost:
        dist.destroy_process_group()


def peer_failure(error: BaseException) -> Optional[RunError]:
    """The one-line RunError to report when ``error`` is a collective that failed because another
    process of the job is gone or silent; None for any other error (or outside a process group).

    gloo raises at once when a peer's connection closes (a killed process, a crashed node) and
    after ``FCT_DIST_TIMEOUT_S`` when it stays silent; either way the survivor learns only that
    its collective failed, not why the other rank stopped, so the message says where to look."""
    global _peer_lost
    if not is_dist():
        return None
    chain: list[BaseException] = []
    seen: Optional[BaseException] = error
    while seen is not None and len(chain) < 8:  # the error and what it was raised from
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any(isinstance(e, dist.DistError)
               or (isinstance(e, RuntimeError) and _PEER_LOST.search(str(e))) for e in chain):
        return None
    _peer_lost = True
    # the error's first sentence, without its C++ source location or gloo's generic advice
    detail = _SOURCE_LOCATION.sub("", " ".join(str(error).split())).split(". ")[0]
    if len(detail) > 160:
        detail = detail[:157] + "..."
    waited = f"{TIMEOUT_ENV}={timeout().total_seconds():g} s"
    return RunError(
        f"rank {rank()} of {world_size()}: a collective operation failed ({detail or type(error).__name__}): "
        "most likely another rank or node of this job has stopped (killed, crashed, out of memory, node "
        f"lost; its own log says why) or did not answer within {waited}. The last checkpoint is kept: "
        "rerun the same command on every node to resume"
    )


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
