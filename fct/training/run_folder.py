"""A training run's folder, made safe before anything is written into it.

``open_run_folder`` does, in this order and before the first training step:
1. refuses output paths that are inputs, unwritable, or of the wrong kind (``fct.outputs``);
2. takes an exclusive OS lock on ``run_dir/.lock`` (``fcntl.flock``: released by the kernel when
   the process dies, so a killed run never leaves a stale lock); a second run into the same folder
   stops with the holder's PID;
3. removes temporary files that a killed write left behind (``.<name>.*.tmp``), now that no other
   run can be writing them;
4. reads the checkpoint once and refuses a resume whose config changed, naming every changed key;
5. only then writes ``config.yaml``.
All of it runs on rank 0 (the other ranks read the checkpoint when they resume); a failure there stops every rank (``dist.on_main_for_all``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Mapping, Optional, Union

from fct import dist
from fct.errors import UserError
from fct.outputs import check_outputs
from fct.training.checkpoint import Checkpointer, write_resolved_config

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock`` holding the owner's PID."""

    def __init__(self, folder: PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another run (PID {holder}); wait for it to finish, "
                "or set output_dir to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock; the file stays
            self.fd = None


def remove_stale_temp_files(folder: PathLike, names: Optional[list[str]] = None) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files (left by a write killed before its rename) in ``folder``:
    all of them, or only those of the given file names. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [".*.tmp"] if names is None else [f".{n}.*.tmp" for n in names]
    removed = []
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class RunFolder:
    """The locked run folder and its checkpoint (read once). Use as a context manager, or call
    ``close`` when the run ends."""

    def __init__(self, run_dir: PathLike) -> None:
        self.path = Path(run_dir)
        self.checkpointer = Checkpointer(run_dir)
        self.lock = RunLock(run_dir)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run_folder(
    run_dir: PathLike,
    config: dict,
    *,
    output_files: Mapping[str, Optional[PathLike]],
    inputs: Mapping[str, Optional[PathLike]],
    output_folders: Optional[Mapping[str, Optional[PathLike]]] = None,
) -> RunFolder:
    """Check, lock and clean ``run_dir``, refuse a changed config, then write ``config.yaml``.

    output_files / inputs / output_folders: config key -> path, as for ``fct.outputs.check_outputs``
    (the run folder itself is checked as ``output_dir``). Collective: every rank calls it."""
    run = RunFolder(run_dir)
    checkpoint = {"the run's checkpoint": run.checkpointer.path}

    def prepare() -> None:
        check_outputs(output_files, {**inputs, **checkpoint}, {"output_dir": run_dir, **(output_folders or {})})
        run.lock.acquire()
        try:
            remove_stale_temp_files(run_dir)
            for path in output_files.values():
                if path:
                    remove_stale_temp_files(Path(path).parent, [Path(path).name])
            run.checkpointer.check_config(config)
            write_resolved_config(run_dir, config)
        except BaseException:
            run.close()
            raise

    dist.on_main_for_all(prepare)
    return run
