"""Convert stored embeddings of one registry version into another's space, chunk by chunk.

Input: a ``.npy`` (N, d) float array, or a ``.npz`` with ``features`` (N, d) and optional
``labels`` (N,) (copied through). Neither is loaded whole: a ``.npy`` is memory-mapped, and so is
an ``.npz`` member stored uncompressed (what ``np.savez`` writes), found through the zip's local
header. A compressed member (``np.savez_compressed``) cannot be mapped and is loaded into memory,
with a note on stderr.

Output: float32 (N, d_target), the maps' precision. Rows are written into a memory-mapped
temporary ``.npy`` beside the target; after every chunk the number of finished rows is saved in a
JSON sidecar (atomic), so rerunning the same command after an interruption continues from the
last finished chunk. The sidecar is trusted only when the input file (path, size, mtime), the two
versions and the chain of edges (with the map files' hashes) are unchanged; otherwise the
conversion starts over. At the end the file is renamed onto the target (or packed into it for an
``.npz`` target) and the sidecar removed.

Rows holding NaN or infinite values (as float32, what the maps see) are counted as they are
converted (the count and the first such row are kept in the sidecar, so a resumed run reports the
whole file) and converted as they are, with one ``warning:`` line on stderr at the end; with
``strict`` (``--strict``) the whole input is scanned first and such a file is refused before
anything is written.

Command line::

    python -m fct.compat.convert --registry DIR --from A --to B --input X.npy --output Y.npy [--strict]
    torchrun --nproc_per_node G -m fct.compat.convert ...   # the rows split over G processes, one output

Under torchrun the rows still to convert are cut into one consecutive piece per process; each
process writes its rows into the shared partial file (a file system all processes see: one node, or
a shared mount) and its progress into ``.<output>.progress.rank<r>.json``; rank 0 packs the output
once every row is done. A rerun, with the same or any other number of processes, gathers the
progress files and converts only the rows no run finished.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from fct import dist
from fct.compat.versions import VersionRegistry, edges_fingerprint
from fct.errors import UserError
from fct.io import atomic_save_npz, atomic_write_json

PathLike = Union[str, os.PathLike]
PROGRESS_FORMAT = "fct-convert-progress"
_SUFFIXES = (".npy", ".npz")


# --------------------------------------------------------------------------------------------
# Reading without loading
# --------------------------------------------------------------------------------------------


def _npz_member_memmap(path: Path, member: str) -> Optional[np.ndarray]:
    """A read-only memmap of ``member`` (e.g. 'features.npy') of an .npz, or None when it is
    compressed or uses a .npy header version this reader does not parse."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject:
        raise UserError(f"{path}: '{member}' holds Python objects, not numbers")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def open_features(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(features (N, d) read-only, usually memory-mapped; labels (N,) in memory or None)."""
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise UserError(f"{path}: embeddings must be a .npy array or a .npz archive with 'features'")
    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    labels = None
    try:
        if path.suffix == ".npy":
            feats = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files:
                    raise UserError(f"{path} holds {', '.join(z.files) or 'nothing'}, not 'features'")
                if "labels" in z.files:
                    labels = np.asarray(z["labels"])
            feats = _npz_member_memmap(path, "features.npy")
            if feats is None:
                print(f"note: {path}: 'features' is stored compressed and cannot be memory-mapped; it is "
                      "loaded into memory (save it with np.savez, not np.savez_compressed, to avoid this)",
                      file=sys.stderr)
                with np.load(path, allow_pickle=False) as z:
                    feats = np.asarray(z["features"])
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: cannot read embeddings ({e})") from None
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
        raise UserError(f"{path}: features must be a 2-d float array (N, d), got shape {feats.shape} "
                        f"dtype {feats.dtype}")
    if labels is not None and labels.shape != (feats.shape[0],):
        raise UserError(f"{path}: labels have shape {labels.shape}, features {feats.shape[0]} rows")
    return feats, labels


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _side_paths(out_path: Path) -> tuple[Path, Path]:
    """(memory-mapped partial .npy, progress sidecar) beside the target."""
    return (out_path.with_name(f".{out_path.name}.partial.npy"),
            out_path.with_name(f".{out_path.name}.progress.json"))


def _rank_sidecar(sidecar: Path, rank: int) -> Path:
    """The progress file of process ``rank`` of a conversion under torchrun."""
    return sidecar.with_name(sidecar.name.replace(".progress.json", f".progress.rank{rank}.json"))


def _all_sidecars(sidecar: Path) -> list[Path]:
    """The progress files of an output: the main one and those of the processes of a torchrun job."""
    stem = sidecar.name[: -len(".progress.json")]
    return sorted(p for p in sidecar.parent.glob(f"{stem}.progress*.json")
                  if p == sidecar or p.name[len(stem):].startswith(".progress.rank"))


def _job(in_path: Path, src: str, dst: str, fingerprint: str, rows: int, dim: int) -> dict[str, Any]:
    st = in_path.stat()
    return {"format": PROGRESS_FORMAT, "input": str(in_path.resolve()), "input_size": st.st_size,
            "input_mtime_ns": st.st_mtime_ns, "source": src, "target": dst, "edges_sha256": fingerprint,
            "rows": rows, "dim": dim, "dtype": "float32"}


@dataclass
class NonFinite:
    """Rows holding NaN or infinite values: how many, and the first one (None when none)."""

    count: int = 0
    first: Optional[int] = None

    def add(self, block: np.ndarray, offset: int) -> None:
        """Count the non-finite rows of ``block``, rows ``offset``.. of the input."""
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(bad):
            self.count += int(len(bad))
            self.first = offset + int(bad[0]) if self.first is None else min(self.first, offset + int(bad[0]))

    def merge(self, other: "NonFinite") -> None:
        self.count += other.count
        if other.first is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)

    def describe(self, path: Path, rows: int) -> str:
        return (f"{path}: {self.count} of {rows} rows hold NaN or infinite values (as float32), "
                f"first at row {self.first}")


def _as_float32(block: np.ndarray) -> np.ndarray:
    """A writable float32 copy of rows of the input; values beyond float32's range become
    infinite (and are then counted) without numpy's overflow warning."""
    with np.errstate(over="ignore"):
        return np.array(block, dtype=np.float32)


def scan_nonfinite(feats: np.ndarray, chunk_rows: int) -> NonFinite:
    """The non-finite rows of ``feats`` (N, d), read chunk by chunk (a memmap is never loaded whole)."""
    found = NonFinite()
    for start in range(0, feats.shape[0], chunk_rows):
        found.add(_as_float32(feats[start:start + chunk_rows]), start)
    return found


Intervals = list[tuple[int, int]]


def merge_intervals(intervals: Sequence[Sequence[int]]) -> Intervals:
    """Sorted, disjoint, non-adjacent [start, stop) intervals covering the same rows."""
    out: Intervals = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def rows_in(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


def share_of_remaining(done: Intervals, rows: int, rank: int, world: int) -> Intervals:
    """The rows of process ``rank`` of ``world``: the rows of [0, rows) not in ``done``, in order,
    cut into ``world`` consecutive pieces of equal size (to one row)."""
    todo, at = [], 0
    for a, b in merge_intervals(done) + [(rows, rows)]:
        if a > at:
            todo.append((at, a))
        at = max(at, b)
    left = rows_in(todo)
    lo, hi = left * rank // world, left * (rank + 1) // world  # in remaining-row coordinates
    mine, seen = [], 0
    for a, b in todo:
        s, e = max(a, a + lo - seen), min(b, a + hi - seen)
        if e > s:
            mine.append((s, e))
        seen += b - a
    return mine


def _read_progress(path: Path, job: dict[str, Any]) -> Optional[tuple[Intervals, NonFinite]]:
    """(done intervals, non-finite rows among them) of one progress file of this very job, or None
    when it is unreadable, of another job, or inconsistent."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or {k: saved.get(k) for k in job} != job:
        return None
    done, count, first = saved.get("done"), saved.get("nonfinite_rows"), saved.get("first_nonfinite_row")
    if not (isinstance(done, list) and all(isinstance(d, list) and len(d) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in d) and 0 <= d[0] <= d[1] <= job["rows"]
            for d in done)):
        return None
    intervals = merge_intervals(done)
    n = rows_in(intervals)
    if not isinstance(count, int) or not 0 <= count <= n:
        return None
    if not (first is None and count == 0 or isinstance(first, int) and count > 0
            and any(a <= first < b for a, b in intervals)):
        return None
    return intervals, NonFinite(count, first)


def _resume_point(sidecar: Path, partial: Path, job: dict[str, Any]) -> tuple[Intervals, NonFinite]:
    """Rows already converted by interrupted runs of the same job (by any number of processes) and
    the non-finite rows among them (([], none) when there is no such run or anything changed)."""
    fresh: tuple[Intervals, NonFinite] = ([], NonFinite())
    files = _all_sidecars(sidecar)
    if not (files and partial.is_file()):
        return fresh
    done: Intervals = []
    nonfinite = NonFinite()
    for f in files:
        got = _read_progress(f, job)
        if got is None:
            return fresh
        if any(a < d1 and d0 < b for a, b in got[0] for d0, d1 in done):
            return fresh  # two processes claim the same rows: not a state this module writes
        done = merge_intervals(done + got[0])
        nonfinite.merge(got[1])
    try:
        existing = np.load(partial, mmap_mode="r")
    except (OSError, ValueError):
        return fresh
    if existing.shape != (job["rows"], job["dim"]) or existing.dtype != np.float32:
        return fresh
    return done, nonfinite


def _progress_record(job: dict[str, Any], done: Intervals, nonfinite: NonFinite) -> dict[str, Any]:
    return {**job, "done": [list(d) for d in done], "done_rows": rows_in(done),
            "nonfinite_rows": nonfinite.count, "first_nonfinite_row": nonfinite.first}


def _prepare(sidecar: Path, partial: Path, job: dict[str, Any]) -> tuple[Intervals, NonFinite]:
    """Rank 0 (or the only process): the rows done by earlier runs, gathered into the main progress
    file; a fresh partial file when there are none."""
    done, nonfinite = _resume_point(sidecar, partial, job)
    if done:
        atomic_write_json(_progress_record(job, done, nonfinite), sidecar)
        for f in _all_sidecars(sidecar):
            if f != sidecar:
                f.unlink()
    else:
        for f in _all_sidecars(sidecar):
            f.unlink()
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(job["rows"], job["dim"]))
    return done, nonfinite


def convert_embeddings(registry: Union[VersionRegistry, PathLike], src_version: str, dst_version: str,
                       in_path: PathLike, out_path: PathLike, chunk_rows: int = 8192, progress: bool = True,
                       device: Union[str, torch.device] = "cpu", strict: bool = False) -> dict[str, Any]:
    """Bring the (N, d_src) embeddings in ``in_path`` into ``dst_version``'s space; write (N, d_dst)
    float32 to ``out_path`` (.npy, or .npz with ``features`` and the input's ``labels``).

    Resumable (see the module docstring). Under torchrun (a process group initialised, see
    ``fct.dist.init``) the rows still to convert are cut into one consecutive piece per process,
    each process writes its rows into the one shared partial file and keeps its own progress file,
    and rank 0 finishes the output; a rerun with any number of processes resumes.
    An .npz target is packed at the end by streaming the finished memmap through ``np.savez`` (the
    rows are not copied into memory; labels are).
    Input rows with NaN or infinite values are converted as they are with a ``warning:`` line on
    stderr; ``strict`` refuses such an input (UserError) before writing anything.
    Returns a summary: rows, dims, the chain of edges, ``resumed_from_row`` (rows converted by
    earlier runs), this process's rows (``rows_here``), the non-finite input rows
    (``nonfinite_rows``, ``first_nonfinite_row``).
    """
    reg = registry if isinstance(registry, VersionRegistry) else VersionRegistry.open(registry)
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.suffix not in _SUFFIXES:
        raise UserError(f"output {out_path} must end in .npy or .npz")
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise UserError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise UserError(f"output {out_path} is the input file; write to another path")
    src, dst = reg.get(src_version), reg.get(dst_version)
    edges = reg.path(src.id, dst.id)
    feats, labels = open_features(in_path)
    rows = feats.shape[0]
    if feats.shape[1] != src.dim:
        raise UserError(f"{in_path} holds {feats.shape[1]}-d embeddings, but version {src.id} has "
                        f"dim {src.dim}")
    fn = reg.compose(edges, device)
    partial, sidecar = _side_paths(out_path)
    job = _job(in_path, src.id, dst.id, edges_fingerprint(edges), rows, dst.dim)
    rank, world = dist.rank(), dist.world_size()

    def start() -> None:
        if strict:
            found = scan_nonfinite(feats, chunk_rows)
            if found.count:
                raise UserError(f"{found.describe(in_path, rows)}; --strict refuses them: fix or drop those rows")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shared[:] = [_prepare(sidecar, partial, job)]

    shared: list = []
    dist.on_main_for_all(start)
    before, nonfinite = dist.broadcast_object(shared[0] if shared else None)  # type: ignore[misc]
    resumed_from = rows_in(before)
    mine = share_of_remaining(before, rows, rank, world)
    # One process keeps its progress in the main file, with the rows of earlier runs; under
    # torchrun each process has its own file with just its rows (the main one keeps the earlier).
    own, done = (sidecar, list(before)) if world == 1 else (_rank_sidecar(sidecar, rank), [])
    if world > 1:
        nonfinite = NonFinite()
    out = np.lib.format.open_memmap(partial, mode="r+")

    bar = tqdm(total=rows, initial=resumed_from, unit="rows", desc=f"{src.id} -> {dst.id}", dynamic_ncols=True,
               disable=dist.progress_disabled(progress))
    try:
        for a, b in mine:
            for lo in range(a, b, chunk_rows):
                hi = min(lo + chunk_rows, b)
                block = _as_float32(feats[lo:hi])
                nonfinite.add(block, lo)
                y = fn(torch.from_numpy(block))
                if tuple(y.shape) != (hi - lo, dst.dim):
                    raise UserError(f"the chain {src.id} -> {dst.id} gave shape {tuple(y.shape)} for "
                                    f"{hi - lo} rows, expected ({hi - lo}, {dst.dim})")
                out[lo:hi] = y.detach().to("cpu", torch.float32).numpy()
                out.flush()  # rows reach the file before the progress file says they are done
                done = merge_intervals(done + [(lo, hi)])
                atomic_write_json(_progress_record(job, done, nonfinite), own)
                bar.update(min((hi - lo) * world, rows - bar.n))  # rank 0's bar; the others keep its pace
    finally:
        bar.close()
    out.flush()
    del out

    total = NonFinite()

    def finish() -> None:
        got, found = _resume_point(sidecar, partial, job)
        if got != [(0, rows)] and rows:
            raise UserError(f"{out_path}: the processes converted {rows_in(got)} of {rows} rows; rerun to finish")
        total.merge(found)
        if out_path.suffix == ".npy":
            os.replace(partial, out_path)
        else:
            packed = {"features": np.load(partial, mmap_mode="r")}
            if labels is not None:
                packed["labels"] = labels
            atomic_save_npz(out_path, **packed)
            del packed
            partial.unlink()
        for f in _all_sidecars(sidecar):
            f.unlink()
        if total.count:
            print(f"warning: {total.describe(in_path, rows)}; they were converted as they are (use --strict "
                  "to refuse such input)", file=sys.stderr)

    dist.barrier()
    dist.on_main_for_all(finish)
    total = dist.broadcast_object(total)  # type: ignore[assignment]
    return {"source": src.id, "target": dst.id, "rows": rows, "source_dim": src.dim, "target_dim": dst.dim,
            "edges": [e.to_dict() for e in edges], "resumed_from_row": resumed_from, "output": str(out_path),
            "rows_here": rows_in(mine), "processes": world,
            "nonfinite_rows": total.count, "first_nonfinite_row": total.first}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description="Convert stored embeddings between registry versions (resumable).")
    p.add_argument("--registry", required=True, help="registry directory (holds registry.json)")
    p.add_argument("--from", dest="src", required=True, help="version id of the stored embeddings")
    p.add_argument("--to", dest="dst", required=True, help="version id to convert them to")
    p.add_argument("--input", required=True, help=".npy (N, d) or .npz with 'features' (+ 'labels')")
    p.add_argument("--output", required=True, help=".npy or .npz (features + labels) to write")
    p.add_argument("--chunk-rows", type=int, default=8192,
                   help="rows converted (and checkpointed) at a time")
    p.add_argument("--device", default="cpu", help="torch device that applies the maps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="refuse an input with NaN or infinite values (default: convert it with a warning)")
    a = p.parse_args(argv)
    device: Union[str, torch.device] = a.device
    if dist.launched_by_torchrun():  # each process its share of the rows, on its own GPU with --device cuda
        mine = dist.init("cuda" if str(a.device).startswith("cuda") else "cpu")
        device = mine if mine.type == "cuda" else a.device
    summary = convert_embeddings(a.registry, a.src, a.dst, a.input, a.output, chunk_rows=a.chunk_rows,
                                 progress=not a.no_progress, device=device, strict=a.strict)
    if not dist.is_main():
        return summary
    chain = " -> ".join([summary["source"]] + [e["target"] for e in summary["edges"]])
    resumed = f", resumed at row {summary['resumed_from_row']}" if summary["resumed_from_row"] else ""
    print(f"converted {summary['rows']} embeddings {chain} ({summary['source_dim']}-d -> "
          f"{summary['target_dim']}-d{resumed}) into {summary['output']}")
    return summary


if __name__ == "__main__":
    from fct.cli import run_main

    sys.exit(run_main(main))
