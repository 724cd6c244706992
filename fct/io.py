"""Atomic file writes (a reader never sees a half-written checkpoint or result) and the reader of
fct's own tagged JSON files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def current_umask() -> int:
    """The process's umask, read without changing it (Linux /proc); else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename; if
    ``write`` raises (e.g. a verification of what it wrote failed), ``path`` is left as it was.

    The file gets the mode any tool would give a new file (0666 less the umask), not mkstemp's
    0600. A write killed before the rename leaves ``.<name>.*.tmp``; training runs remove those
    of their own outputs when they start (``fct.training.run_folder``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        # Through a file object, the archive's inner folder is torch's fixed "archive" rather than
        # the temporary file's random name: the same object always gives the same bytes.
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Strict JSON: a NaN or infinity raises ValueError instead of writing a file that strict
    parsers reject (producers write null for an undefined metric)."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n", path)


def atomic_save_npy(array: Any, path: str | os.PathLike) -> None:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (the format from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def read_tagged_json(path: Path, fmt: str, version: int, what: str, version_key: str = "version") -> dict:
    """The JSON object in ``path`` written by fct with ``"format": fmt`` and ``version_key: version``;
    a missing, unreadable, foreign or other-version file raises UserError naming ``path`` (``what`` says
    what the file should have been)."""
    from fct.errors import UserError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{path} is not {what} (no \"format\": \"{fmt}\")")
    if data.get(version_key) != version:
        raise UserError(f"{path} has {version_key} {data.get(version_key)!r}; this fct reads version {version}")
    return data


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's contents, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
