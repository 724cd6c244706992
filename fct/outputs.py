"""Checks on a script's output locations, made before any work so a mistake costs nothing.

Each output is named by its config key, so the one-line error says what to change:
- an output that is one of the script's inputs (the same file after resolving links) is refused;
- an output file whose path is an existing directory, or whose parent is a file, is refused;
- an output's folder must accept a new file: a probe file is created and removed in the nearest
  existing folder (the real test: permissions, read-only mounts and ACLs all show up).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

from fct.errors import UserError

PathLike = Union[str, os.PathLike]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(folder: PathLike, key: str) -> None:
    """Raise UserError naming ``key`` unless a file can be created in ``folder`` (or, when it does
    not exist yet, in its nearest existing ancestor, where it would be created)."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{key}: {existing} is a file, so the folder {folder} cannot be created there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fct-write-probe.", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{key}: cannot write into {existing} ({e.strerror or type(e).__name__})") from None


def check_outputs(
    files: Mapping[str, Optional[PathLike]],
    inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
    folders: Optional[Mapping[str, Optional[PathLike]]] = None,
) -> None:
    """Refuse, before any work, output locations that would fail or destroy an input.

    files: config key -> output file path (None: not written by this run).
    inputs: config key -> input file path the run reads (None: not used).
    folders: config key -> output folder (created when missing).
    Raises UserError naming the key and the path.
    """
    ins = {k: Path(v) for k, v in (inputs or {}).items() if v}
    for key, value in files.items():
        if not value:
            continue
        path = Path(value)
        for in_key, in_path in ins.items():
            if _same_file(path, in_path):
                raise UserError(
                    f"{key} is the input {in_key} ({in_path}); writing it would destroy the input: "
                    "choose another output path"
                )
        if path.is_dir():
            raise UserError(f"{key}: {path} is a directory; give a file path")
        probe_writable(path.parent, key)
    for key, value in (folders or {}).items():
        if not value:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise UserError(f"{key}: {path} is a file, not a folder; choose another output folder")
        for in_key, in_path in ins.items():
            if _same_file(path, in_path):
                raise UserError(f"{key} is the input {in_key} ({in_path}); choose another output folder")
        probe_writable(path, key)
