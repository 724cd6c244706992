"""Images held as one uint8 array in memory: the `train.npz` / `val.npz` format.

Each file holds ``images`` uint8 (N, H, W, 3) and ``labels`` int64 (N,). It is what
prepare_dataset.py writes and what the Tiny-ImageNet stand-in ships.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fct.data.transforms import ArrayTransform
from fct.errors import UserError
from fct.io import atomic_write_json

# Per-channel (mean, std) of pixel values in [0, 1].
Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


def npz_path(root: Path, split: str, hint: str) -> Path:
    """The file of one split; a missing folder or file is a UserError naming it and ``hint``."""
    if not root.is_dir():
        raise UserError(f"data_root {root} is not a folder; {hint}")
    path = root / f"{split}.npz"
    if not path.is_file():
        raise UserError(f"{path} not found (expected train.npz and val.npz in {root}); {hint}")
    return path


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def read_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the headers only (no decompression
    of the data)."""
    try:
        with zipfile.ZipFile(path) as z:
            out = {}
            for name in z.namelist():
                if name.endswith(".npy"):
                    with z.open(name) as f:
                        out[name[: -len(".npy")]] = _npy_header(f)
            return out
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npz file: {e}") from None


def _check(path: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    for key in ("images", "labels"):
        if key not in shapes:
            raise UserError(f"{path} lacks the array {key!r} (has: {', '.join(sorted(shapes)) or 'none'})")
    (ishape, idtype), (lshape, ldtype) = shapes["images"], shapes["labels"]
    if len(ishape) != 4 or ishape[3] != 3 or idtype != np.uint8:
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, 3), got {idtype} {ishape}")
    if len(lshape) != 1 or lshape[0] != ishape[0] or not np.issubdtype(ldtype, np.integer):
        raise UserError(f"{path}: 'labels' must be integers of shape ({ishape[0]},), got {ldtype} {lshape}")


def load_labels(path: Path) -> np.ndarray:
    """Labels int64 (N,) of one split, without reading the images."""
    _check(path, read_shapes(path))
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"].astype(np.int64)
    if labels.size and labels.min() < 0:
        raise UserError(f"{path}: labels must be >= 0, found {labels.min()}")
    return labels


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 (N, H, W, 3) and labels int64 (N,) of one split, fully in memory.

    In memory (not memory-mapped) because the files may be compressed, and DataLoader workers
    share the pages of the parent process after fork anyway.
    """
    _check(path, read_shapes(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"].astype(np.int64)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"could not read {path}: {e}") from None
    if labels.size and labels.min() < 0:
        raise UserError(f"{path}: labels must be >= 0, found {labels.min()}")
    return images, labels


def pixel_mean_std(images: np.ndarray, chunk: int = 4096) -> Stats:
    """Per-channel mean and (population) std of the pixel values scaled to [0, 1].

    images: uint8 (N, H, W, 3). Exact: it counts the 256 possible values per channel, so the sums
    are integers, whatever N.
    """
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        for c in range(3):
            counts[c] += np.bincount(block[..., c].reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum(axis=1)
    if (n == 0).any():
        raise UserError("cannot compute mean/std of an empty image set")
    mean = (counts * values).sum(axis=1) / n
    var = (counts * values**2).sum(axis=1) / n - mean**2
    std = np.sqrt(np.maximum(var, 1e-12))
    return (float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2]))


def stats_cache_dir() -> Path:
    """Where derived statistics are cached: ``$FCT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fct``, else
    ``~/.cache/fct``. Never the data folder, which may be read-only or shared."""
    explicit = os.environ.get("FCT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fct"


def _file_key(path: Path) -> dict[str, Any]:
    """The identity of a data file: resolved path, size, mtime and inode. A rewritten or replaced
    file (even one renamed into place) gets a new key, so it is measured again."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _stats_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return stats_cache_dir() / "mean_std" / f"{digest}.json"


def _writable(folder: Path) -> bool:
    """``folder``, or the nearest existing folder above it where it would be created, is writable
    and not marked read-only (root passes ``os.access`` even on an r-x folder)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


# Per process as well, so a data file is measured once per process when nothing can be cached.
_MEMO: dict[str, Stats] = {}


def _read_cached(cache: Path, key: dict[str, Any]) -> Stats | None:
    """The stats stored in ``cache`` for exactly ``key``; None when absent, stale or malformed."""
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") != key:
            return None
        m, sd = saved["mean"], saved["std"]
        return (float(m[0]), float(m[1]), float(m[2])), (float(sd[0]), float(sd[1]), float(sd[2]))
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def _write_cached(cache: Path, key: dict[str, Any], stats: Stats) -> None:
    """Store ``stats`` atomically; a cache folder that cannot be written is skipped silently."""
    if not _writable(cache.parent):
        return
    try:
        atomic_write_json({"key": key, "mean": list(stats[0]), "std": list(stats[1])}, cache)
    except OSError:
        pass  # a cache only; the values are returned either way


def cached_mean_std(train_path: Path, images: np.ndarray | None = None) -> Stats:
    """Mean/std of the training images, cached under :func:`stats_cache_dir` and in memory.

    The cache is keyed by the identity of train.npz (:func:`_file_key`), so a rewritten file is
    measured again. Nothing is ever written beside the data; an unwritable cache folder just
    means it is computed once per process. ``images`` avoids reading the file again when the
    caller already holds it.
    """
    key = _file_key(train_path)
    memo_key = json.dumps(key, sort_keys=True)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    cache = _stats_file(key)
    stats = _read_cached(cache, key)
    if stats is None:
        if images is None:
            images, _ = load_arrays(train_path)
        stats = pixel_mean_std(images)
        _write_cached(cache, key, stats)
    _MEMO[memo_key] = stats
    return stats


class ArrayDataset(Dataset):
    """Items (float32 (3, H, W), label) from uint8 images (N, H, W, 3) kept in memory.

    ``indices`` selects the kept samples without copying the images (a class subset).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: ArrayTransform,
        num_classes_total: int,
        indices: np.ndarray | None = None,
    ) -> None:
        self.images = images
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels: np.ndarray = labels[self.indices].astype(np.int64)
        self.transform = transform
        self.num_classes_total = num_classes_total

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform.single(self.images[self.indices[i]]), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (the DataLoader calls this when it exists): the augmentation
        runs as a few batched tensor ops instead of a dozen small ones per image."""
        idx = np.asarray(indices, dtype=np.int64)
        # Fancy indexing copies, so read-only or memory-mapped arrays are fine.
        out = self.transform.batch(self.images[self.indices[idx]])
        return list(zip(out.unbind(0), self.labels[idx].tolist()))

    def __repr__(self) -> str:
        h, w = self.images.shape[1:3]
        return f"ArrayDataset({len(self)} images {h}x{w}, {self.num_classes_total} classes, {self.transform})"
