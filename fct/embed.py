"""Embed a data set's split with a model file into a features file (stored embeddings).

    python -m fct.embed --config embed.yaml [--set KEY=VALUE ...]

The file (``output_path``, written atomically) holds ``features`` float32 (N, D), ``labels`` int64
(N,), ``ids`` int64 (N,): each image's index in the data set's own arrays (for ``npz`` sets its row
in the split's file), through any class or fraction subset, so files of the same images written by
different models pair by id; a transformed old model with a FastFill head adds its
``log_variance`` (N, S); ``meta`` (a JSON string) records what made the file: the model file's
SHA-256, the data set, split and subset, fct's version. A rerun whose file already holds exactly
that is a no-op, so recipes rerun cheaply. These are the stored embeddings of ``train_transformation.py``
(``old_features_path`` ...), ``eval.py`` (``*_features_path``) and ``compat.py`` (``features_path``).
Images get the evaluation transforms (no augmentation); timm / torchvision backbones get them at
their own resolution and normalisation. Under ``torchrun`` every process embeds its share.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from fct import dist
from fct.config.embed import EmbedConfig
from fct.errors import UserError


def split_ids(dataset: Any) -> np.ndarray:
    """Each item's index in the data set's arrays (int64 (N,)), through class and fraction subsets."""
    from fct.data.datasets import LabelledSubset

    if isinstance(dataset, LabelledSubset):
        return split_ids(dataset.base)[dataset.indices]
    indices = getattr(dataset, "indices", None)
    return np.asarray(indices if indices is not None else np.arange(len(dataset)), dtype=np.int64)


def provenance(cfg: EmbedConfig) -> dict[str, Any]:
    """What a features file written for ``cfg`` holds, as stored in its ``meta``."""
    import fct
    from fct.io import file_sha256

    dp = cfg.dataset_params
    return {"model_sha256": file_sha256(cfg.model_path), "dataset": dp.name,
            "data_root": str(Path(dp.data_root).resolve()) if dp.data_root else "", "split": cfg.split,
            "num_classes": dp.num_classes,
            "train_fraction": [dp.train_fraction, dp.train_fraction_seed] if cfg.split == "train" else None,
            "code_version": fct.__version__}


def stored_provenance(path: str) -> Optional[dict[str, Any]]:
    """The ``meta`` of an existing features file; None when absent or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"])) if "meta" in z.files else None
    except Exception:  # noqa: BLE001 - a damaged file is simply rewritten
        return None


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Write ``cfg.output_path`` (unless it already holds these embeddings); returns a record:
    path, rows, dim, seconds, images_per_s (and ``up_to_date`` when nothing was done)."""
    from fct.data import build_dataset, dataset_info
    from fct.data.datasets import take_fraction
    from fct.io import atomic_write
    from fct.models import load_model_file
    from fct.outputs import check_outputs
    from fct.retrieval.features import extract_features, extract_features_and_uncertainty
    from fct.runtime import make_runtime

    dp = cfg.dataset_params
    check_outputs(files={"output_path": cfg.output_path}, inputs={"model_path": cfg.model_path})
    if not os.path.isfile(cfg.model_path):
        raise UserError(f"model_path {cfg.model_path} does not exist")
    made = provenance(cfg)
    if stored_provenance(cfg.output_path) == made:
        if dist.is_main():
            print(f"{cfg.output_path} is up to date (same model file, data and split)")
        return {"path": cfg.output_path, "up_to_date": True}
    rt = make_runtime(cfg.runtime)
    dataset = build_dataset(dp.name, dp.data_root, cfg.split, augment=False, num_classes=dp.num_classes)
    if cfg.split == "train":
        dataset = take_fraction(dataset, dp.train_fraction, dp.train_fraction_seed)
    info = dataset_info(dp.name, dp.data_root)
    model = load_model_file(cfg.model_path, map_location="cpu", example_input=dataset[0][0],
                            input_stats=(info.mean, info.std))
    model = rt.prepare_model(model).eval()
    kw = dict(batch_size=max(1, dp.batch_size // dist.world_size()), num_workers=dp.num_workers,
              device=rt.device, amp_dtype=rt.amp_dtype, channels_last=rt.channels_last,
              progress=rt.params.progress)
    t0 = time.perf_counter()
    transformation = getattr(model, "transformation", None)
    log_var = None
    if getattr(transformation, "has_uncertainty", False):
        feats, labels, log_var = extract_features_and_uncertainty(model, dataset, **kw)
    else:
        feats, labels = extract_features(model, dataset, **kw)
    seconds = time.perf_counter() - t0
    arrays = {"features": feats.float().numpy(), "labels": labels.numpy().astype(np.int64),
              "ids": split_ids(dataset), "meta": np.array(json.dumps(made, sort_keys=True))}
    if log_var is not None:
        arrays["log_variance"] = log_var.float().numpy()
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, **arrays)

    if dist.is_main():
        atomic_write(cfg.output_path, write)
    dist.barrier()
    record = {"path": cfg.output_path, "rows": int(len(labels)), "dim": int(feats.shape[1]),
              "seconds": round(seconds, 1), "images_per_s": round(len(labels) / max(seconds, 1e-9), 1)}
    if dist.is_main():
        print(f"{cfg.output_path}: {record['rows']} x {record['dim']} embeddings of the {cfg.split} split by "
              f"{cfg.model_path} ({record['images_per_s']} images/s)")
    return record


def main(argv: Optional[Sequence[str]] = None) -> None:
    from fct.cli import config_parser
    from fct.config import load_config

    args = config_parser("python -m fct.embed: " + __doc__.splitlines()[0]).parse_args(argv)
    embed(load_config(EmbedConfig, args.config, args.overrides))


if __name__ == "__main__":
    from fct.cli import run_main

    sys.exit(run_main(main))
