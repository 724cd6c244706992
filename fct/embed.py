"""Embed a data set's split with a model file into stored embeddings.

    python -m fct.embed --config embed.yaml [--set KEY=VALUE ...]
    torchrun --nproc_per_node G -m fct.embed --config embed.yaml     # G processes, one output

Two outputs, by ``output_path``:

- ``*.npz``, one features file (written atomically): ``features`` float32 (N, D), ``labels`` int64
  (N,), ``ids`` int64 (N,), ``log_variance`` (N, S) for a transformed old model with a FastFill
  head, and ``meta``. Under ``torchrun`` the processes share the work and rank 0 writes the file.
- a folder, for collections too large for one pass: shards of ``shard_size`` rows,
  ``features-<k>.npy``, ``labels-<k>.npy``, ``ids-<k>.npy`` (and ``log_variance-<k>.npy``), each
  written atomically and marked done by ``shard-<k>.done``; under ``torchrun`` process r embeds
  shards r, r + W, ... on its own. A killed run resumes at the first unfinished shard (only the
  shards in flight are redone). ``manifest.json`` (the meta, the shard count, rows and width),
  written last, marks the folder complete. Every reader of features files (``eval.py``,
  ``compat.py``, ``train_transformation.py``) takes such a folder wherever it takes an ``.npz``.
  A webdataset stream (``dataset_params.name: webdataset``) is embedded into a folder only, one
  output shard per non-empty input shard (in the index's order, ids from the shards).

``ids``: each image's index in the data set's own arrays (for ``npz`` sets its row in the split's
file), through any class or fraction subset, so files of the same images written by different
models pair by id. ``meta`` (a JSON string; the folder's ``meta.json``) records what made the
embeddings: the model file's SHA-256, the data set, split and subset, fct's version. A rerun whose
output already holds exactly that does nothing; a folder holding embeddings made otherwise is
refused rather than mixed. Images get the evaluation transforms (no augmentation); timm /
torchvision backbones get them at their own resolution and normalisation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from fct import dist
from fct.config.embed import EmbedConfig
from fct.errors import UserError
from fct.retrieval.embeddings import MANIFEST, shard_file

META = "meta.json"  # what a sharded output holds, written before its first shard


def split_ids(dataset: Any) -> np.ndarray:
    """Each item's index in the data set's arrays (int64 (N,)), through class and fraction subsets."""
    from fct.data.datasets import LabelledSubset

    if isinstance(dataset, LabelledSubset):
        return split_ids(dataset.base)[dataset.indices]
    indices = getattr(dataset, "indices", None)
    return np.asarray(indices if indices is not None else np.arange(len(dataset)), dtype=np.int64)


def provenance(cfg: EmbedConfig) -> dict[str, Any]:
    """What embeddings written for ``cfg`` hold, as stored in their ``meta``."""
    import fct
    from fct.io import file_sha256

    dp = cfg.dataset_params
    made = {"model_sha256": file_sha256(cfg.model_path), "dataset": dp.name,
            "data_root": str(Path(dp.data_root).resolve()) if dp.data_root else "", "split": cfg.split,
            "num_classes": dp.num_classes,
            "train_fraction": [dp.train_fraction, dp.train_fraction_seed] if cfg.split == "train" else None,
            "code_version": fct.__version__}
    if dp.name == "webdataset" and dp.urls is not None:  # other shards than the index's
        made["urls"] = getattr(dp.urls, cfg.split)
    return made


def stored_provenance(path: str) -> Optional[dict[str, Any]]:
    """The ``meta`` of a complete output (an ``.npz`` or a sharded folder's manifest); None when
    absent, incomplete or unreadable."""
    try:
        if os.path.isdir(path):
            manifest = Path(path) / MANIFEST
            return json.loads(manifest.read_text())["meta"] if manifest.is_file() else None
        if not os.path.isfile(path):
            return None
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"])) if "meta" in z.files else None
    except Exception:  # noqa: BLE001 - a damaged output is simply rewritten
        return None


def _extractor(model: Any) -> Any:
    from fct.retrieval.features import extract_features, extract_features_and_uncertainty

    if getattr(getattr(model, "transformation", None), "has_uncertainty", False):
        return extract_features_and_uncertainty  # a FastFill gallery model: its sigma too
    return lambda m, d, **kw: (*extract_features(m, d, **kw), None)


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Write ``cfg.output_path`` (unless it already holds these embeddings); returns a record:
    path, rows, dim, seconds, images_per_s (and ``up_to_date`` when nothing was done)."""
    from fct.data import build_dataset, dataset_info
    from fct.data.datasets import take_fraction
    from fct.models import load_model_file
    from fct.outputs import check_outputs
    from fct.runtime import make_runtime

    dp = cfg.dataset_params
    sharded = not cfg.output_path.endswith(".npz")
    if sharded:
        check_outputs(files={}, inputs={"model_path": cfg.model_path}, folders={"output_path": cfg.output_path})
    else:
        check_outputs(files={"output_path": cfg.output_path}, inputs={"model_path": cfg.model_path})
    if not os.path.isfile(cfg.model_path):
        raise UserError(f"model_path {cfg.model_path} does not exist")
    made = provenance(cfg)
    if stored_provenance(cfg.output_path) == made:
        if dist.is_main():
            print(f"{cfg.output_path} is up to date (same model file, data and split)")
        return {"path": cfg.output_path, "up_to_date": True}
    if sharded:
        _check_folder(Path(cfg.output_path), made)
    rt = make_runtime(cfg.runtime)
    stream = dp.name == "webdataset"
    if stream and not sharded:
        raise UserError(f"output_path {cfg.output_path}: a webdataset stream is embedded shard by shard into a "
                        "folder (one output shard per input shard); give a folder, not an .npz")
    dataset = build_dataset(dp.name, dp.data_root, cfg.split, augment=False, num_classes=dp.num_classes,
                            options=dp)
    if cfg.split == "train" and not stream:
        dataset = take_fraction(dataset, dp.train_fraction, dp.train_fraction_seed)
    info = dataset_info(dp.name, dp.data_root, dp)
    model = load_model_file(cfg.model_path, map_location="cpu", example_input=dataset[0][0],
                            input_stats=(info.mean, info.std))
    model = rt.prepare_model(model).eval()
    kw = dict(batch_size=max(1, dp.batch_size // dist.world_size()), num_workers=dp.num_workers,
              device=rt.device, amp_dtype=rt.amp_dtype, channels_last=rt.channels_last)
    t0 = time.perf_counter()
    if sharded:
        rows, dim, done_here = _embed_shards(cfg, model, _pieces(dataset, cfg.shard_size), made, kw,
                                                 rt.params.progress)
    else:
        rows, dim = _embed_file(cfg, model, dataset, made, {**kw, "progress": rt.params.progress})
        done_here = rows
    seconds = time.perf_counter() - t0
    record = {"path": cfg.output_path, "rows": rows, "dim": dim, "seconds": round(seconds, 1),
              "images_per_s": round(done_here / max(seconds, 1e-9), 1)}
    if dist.is_main():
        print(f"{cfg.output_path}: {rows} x {dim} embeddings of the {cfg.split} split by {cfg.model_path} "
              f"({record['images_per_s']} images/s{' on rank 0' if sharded and dist.is_dist() else ''})")
    return record


def _embed_file(cfg: EmbedConfig, model: Any, dataset: Any, made: dict, kw: dict) -> tuple[int, int]:
    from fct.io import atomic_save_npz

    feats, labels, log_var = _extractor(model)(model, dataset, **kw)
    arrays = {"features": feats.float().numpy(), "labels": labels.numpy().astype(np.int64),
              "ids": split_ids(dataset), "meta": np.array(json.dumps(made, sort_keys=True))}
    if log_var is not None:
        arrays["log_variance"] = log_var.float().numpy()
    if dist.is_main():
        atomic_save_npz(cfg.output_path, **arrays)
    dist.barrier()
    return int(len(labels)), int(feats.shape[1])


def _check_folder(root: Path, made: dict) -> None:
    """A sharded output folder must be new, empty, or hold shards of these very embeddings."""
    meta = root / META
    if meta.is_file():
        try:
            held = json.loads(meta.read_text())
        except ValueError:
            held = None
        if held != made:
            raise UserError(f"output_path {root} holds embeddings made otherwise ({META}: another model file, data "
                            "or split); delete the folder or choose another output_path")
    elif root.is_dir() and any(root.iterdir()):
        raise UserError(f"output_path {root} is a folder with other files in it; give a new or empty folder")


# One output shard: its size, and a function giving (its images as a map-style data set, their ids).
Piece = tuple[int, Callable[[], tuple[Any, np.ndarray]]]


def _pieces(dataset: Any, size: int) -> list[Piece]:
    """The output shards of ``dataset``: ``size`` consecutive rows each, or for a webdataset
    stream one per non-empty input shard, in the index's order."""
    from torch.utils.data import Subset

    from fct.data.webdataset import ShardStream, shard_parts

    if isinstance(dataset, ShardStream):
        return shard_parts(dataset)  # type: ignore[return-value]
    n = len(dataset)
    ids = split_ids(dataset)

    def rows(start: int) -> Callable[[], tuple[Any, np.ndarray]]:
        stop = min(n, start + size)
        return lambda: (Subset(dataset, range(start, stop)), ids[start:stop])

    return [(min(size, n - start), rows(start)) for start in range(0, n, size)]


def _embed_shards(cfg: EmbedConfig, model: Any, pieces: list[Piece], made: dict, kw: dict,
                  progress: bool) -> tuple[int, int, int]:
    """This process's shards (k = rank, rank + W, ...), skipping finished ones; rank 0 writes the
    manifest once every shard is done. Returns (rows, width, rows embedded by this process)."""
    from fct.io import atomic_save_npy, atomic_write_json, atomic_write_text

    root = Path(cfg.output_path)
    n, shards = sum(size for size, _ in pieces), len(pieces)
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / META).is_file():
            atomic_write_json(made, root / META)
    dist.barrier()
    mine = [k for k in range(dist.rank(), shards, dist.world_size()) if not (root / f"shard-{k:05d}.done").is_file()]
    extract = _extractor(model)
    done_here = 0
    bar = tqdm(total=sum(pieces[k][0] for k in mine), desc="embedding", unit="img",
               disable=dist.progress_disabled(progress))
    for k in mine:
        part, ids = pieces[k][1]()
        feats, labels, log_var = extract(model, part, progress=False, gather=False, **kw)
        arrays = {"features": feats.float().numpy(), "labels": labels.numpy().astype(np.int64), "ids": ids}
        if log_var is not None:
            arrays["log_variance"] = log_var.float().numpy()
        for name, a in arrays.items():
            atomic_save_npy(a, shard_file(root, name, k))
        atomic_write_text(f"{len(ids)}\n", root / f"shard-{k:05d}.done")  # last: the shard is complete
        done_here += len(ids)
        bar.update(len(ids))
    bar.close()
    dist.barrier()
    dim = int(np.load(shard_file(root, "features", 0), mmap_mode="r").shape[1])
    if dist.is_main():
        names = ["features", "labels", "ids"] + (["log_variance"] if shard_file(root, "log_variance", 0).is_file()
                                                 else [])
        atomic_write_json({"meta": made, "shards": shards, "rows": n, "dim": dim, "arrays": names,
                           "shard_rows": [size for size, _ in pieces]}, root / MANIFEST)
    dist.barrier()
    return n, dim, done_here


def main(argv: Optional[Sequence[str]] = None) -> None:
    from fct.cli import config_parser
    from fct.config import load_config

    args = config_parser("python -m fct.embed: " + __doc__.splitlines()[0]).parse_args(argv)
    embed(load_config(EmbedConfig, args.config, args.overrides))


if __name__ == "__main__":
    from fct.cli import run_main

    sys.exit(run_main(main))
