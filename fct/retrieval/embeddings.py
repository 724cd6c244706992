"""The embeddings an evaluation compares: read from a features file or computed by a model on the
evaluation split, looked up by the config key of each side, and the leave-one-out rule."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fct import dist
from fct.config import DatasetParams, EvalConfig
from fct.errors import UserError
from fct.runtime import Runtime
from fct.transformations.heads import uncertainty_score

# The sides of an evaluation config: ``<side>_features_path`` or ``<side>_model_path`` names each.
SIDES = ("query", "gallery", "reference_query", "reference_gallery")


@dataclass
class Embeddings:
    features: torch.Tensor  # (N, D) float32, CPU
    labels: torch.Tensor  # (N,) int64
    source: str  # the file it came from
    # (N,) larger = more uncertain (FastFill), or None when the source predicts none
    uncertainty: Optional[torch.Tensor] = None


@dataclass
class FeatureFile:
    """One stored-embeddings ``.npz`` as written, checked for shape (dtypes kept)."""

    path: str
    features: np.ndarray  # (N, D) float
    labels: np.ndarray  # (N,) int
    ids: Optional[np.ndarray] = None  # (N,) int or str, unique: what pairs rows across files
    log_variance: Optional[np.ndarray] = None  # (N,) or (N, S) float: a FastFill gallery's uncertainty


MANIFEST = "manifest.json"  # marks a complete sharded features folder (python -m fct.embed)


def shard_file(folder: Path, name: str, k: int) -> Path:
    return folder / f"{name}-{k:05d}.npy"


def read_sharded(folder: str) -> dict[str, np.ndarray]:
    """The arrays of a complete sharded output, shards concatenated in order: ``features``,
    ``labels``, ``ids`` and ``log_variance`` when present. UserError on an incomplete folder."""
    root = Path(folder)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{folder} is not a complete sharded features folder (no {MANIFEST}: an embedding run "
                        "that has not finished; rerun it to complete the folder)")
    try:
        manifest = json.loads(manifest_path.read_text())
        names = manifest["arrays"]
        out = {n: np.concatenate([np.load(shard_file(root, n, k), mmap_mode="r", allow_pickle=False)
                                  for k in range(manifest["shards"])]) for n in names}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}: a shard is missing or damaged ({type(e).__name__}: {e}); delete the folder "
                        "and embed again") from None
    if len(out["features"]) != manifest["rows"]:
        raise UserError(f"{folder}: {len(out['features'])} rows in the shards, {manifest['rows']} in {MANIFEST}")
    return out


def read_feature_file(path: str) -> FeatureFile:
    """An ``.npz`` with ``features`` float (N, D) and ``labels`` int (N,); optionally ``ids``
    (N,) int or str and ``log_variance`` float (N,) or (N, S); or a folder of shards written by
    ``python -m fct.embed`` holding the same arrays. A malformed file is a UserError."""
    if os.path.isdir(path):
        return _checked(path, read_sharded(path))
    if not os.path.isfile(path):
        raise UserError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("features", "labels") if k not in z.files]
            if missing:
                raise UserError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(z.files) or 'none'}")
            arrays = {k: z[k] for k in ("features", "labels", "ids", "log_variance") if k in z.files}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/format errors of any kind
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return _checked(path, arrays)


def _checked(path: str, arrays: dict[str, np.ndarray]) -> FeatureFile:
    feats, labels = arrays["features"], arrays["labels"]
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
        raise UserError(f"{path}: 'features' must be a float array (N, D), got {feats.dtype} {feats.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(feats):
        raise UserError(
            f"{path}: 'labels' must be an int array (N,) with N={len(feats)}, got {labels.dtype} {labels.shape}"
        )
    ids = arrays.get("ids")
    if ids is not None:
        if ids.ndim != 1 or len(ids) != len(feats) or ids.dtype.kind not in "iuUS":
            raise UserError(f"{path}: 'ids' must be an int or str array (N,) with N={len(feats)}, "
                            f"got {ids.dtype} {ids.shape}")
        if len(np.unique(ids)) != len(ids):
            raise UserError(f"{path}: 'ids' holds duplicates; each row needs its own id")
    log_var = arrays.get("log_variance")
    if log_var is not None and (log_var.ndim not in (1, 2) or len(log_var) != len(feats)
                                or not np.issubdtype(log_var.dtype, np.floating)):
        raise UserError(
            f"{path}: 'log_variance' must be a float array (N,) or (N, S) with N={len(feats)}, "
            f"got {log_var.dtype} {log_var.shape}"
        )
    return FeatureFile(path, feats, labels, ids, log_var)


def _rows(f: FeatureFile, order: np.ndarray) -> FeatureFile:
    lv = None if f.log_variance is None else f.log_variance[order]
    return FeatureFile(f.path, f.features[order], f.labels[order], None if f.ids is None else f.ids[order], lv)


def pair_feature_files(files: list[FeatureFile]) -> list[FeatureFile]:
    """The same images' rows in every file, in the first file's order: paired by ``ids`` when
    every file has them, else by position. A count, ids, labels or features-dtype mismatch is a
    UserError that names both files."""
    first = files[0]
    by_ids = all(f.ids is not None for f in files)
    out = [first]
    for f in files[1:]:
        both = f"{first.path} and {f.path}"
        if f.features.dtype != first.features.dtype:
            raise UserError(f"{both}: features are {first.features.dtype} vs {f.features.dtype}; "
                            "store every file with one dtype")
        if len(f.labels) != len(first.labels):
            raise UserError(f"{both}: {len(first.labels)} vs {len(f.labels)} rows; the files must hold the same images")
        if by_ids:
            assert first.ids is not None and f.ids is not None
            if first.ids.dtype.kind != f.ids.dtype.kind and {first.ids.dtype.kind, f.ids.dtype.kind} != {"i", "u"}:
                raise UserError(f"{both}: ids are {first.ids.dtype} vs {f.ids.dtype}; store one kind of id")
            a, b = np.argsort(first.ids, kind="stable"), np.argsort(f.ids, kind="stable")
            if not np.array_equal(first.ids[a], f.ids[b]):
                unknown = np.setdiff1d(first.ids, f.ids)
                raise UserError(f"{both}: the ids differ ({len(unknown)} of {first.path}'s ids are not in "
                                f"{f.path}, e.g. {unknown[0].item()!r}); the files must hold the same images")
            order = np.empty_like(b)
            order[a] = b  # row i of first is row order[i] of f
            f = _rows(f, order)
        if not np.array_equal(f.labels, first.labels):
            bad = np.flatnonzero(f.labels != first.labels)
            how = "by ids" if by_ids else "by position"
            raise UserError(f"{both}: labels differ at {len(bad)} of {len(f.labels)} rows paired {how} (first at "
                            f"row {bad[0]}: {first.labels[bad[0]]} vs {f.labels[bad[0]]})")
        out.append(f)
    return out


def load_feature_file(path: str) -> Embeddings:
    """The embeddings of :func:`read_feature_file`'s ``.npz`` (its ``log_variance``, if any, as uncertainty)."""
    f = read_feature_file(path)
    uncertainty = None
    if f.log_variance is not None:
        n = len(f.features)
        uncertainty = uncertainty_score(torch.from_numpy(f.log_variance.astype(np.float32).reshape(n, -1)))
    return Embeddings(torch.from_numpy(f.features.astype(np.float32, copy=False)),
                      torch.from_numpy(f.labels.astype(np.int64, copy=False)), path, uncertainty)


@torch.inference_mode()
def transformed_embeddings(features_path: str, transformation_path: str, side_path: Optional[str],
                           rt: Runtime, batch_size: int = 4096) -> Embeddings:
    """h(old, side) of stored old-model embeddings (and side-information embeddings, paired by ids
    or position) under the transformation file h; with a FastFill head, its uncertainty too."""
    from fct.models import load_model_file, read_model_file

    kind = read_model_file(transformation_path)["kind"]
    if kind != "transformation":
        raise UserError(f"gallery_transformation_path: {transformation_path} is a {kind!r} model file, "
                        "not a 'transformation' (h) file")
    h = load_model_file(transformation_path, map_location=rt.device).eval()
    files = pair_feature_files([read_feature_file(features_path)]
                               + ([read_feature_file(side_path)] if side_path else []))
    wants_side = h.arch_params()["side_info_dim"] is not None
    if wants_side != (side_path is not None):
        raise UserError(f"{transformation_path} was trained " + (
            f"with side-information ({h.side_info_dim}-d); give gallery_side_info_features_path" if wants_side else
            f"without side-information; drop gallery_side_info_features_path ({side_path})"))
    for f, want, what in ((files[0], h.old_embedding_dim, "old"), (files[-1], h.side_info_dim, "side-information")):
        if f.features.shape[1] != want:
            raise UserError(f"{f.path} holds {f.features.shape[1]}-d embeddings but {transformation_path} takes "
                            f"{want}-d {what} embeddings")
    old = torch.from_numpy(files[0].features.astype(np.float32, copy=False))
    side = torch.from_numpy(files[1].features.astype(np.float32, copy=False)) if side_path else None
    feats, log_vars = [], []
    for i in range(0, len(old), batch_size):
        out = h(old[i: i + batch_size].to(rt.device), None if side is None else side[i: i + batch_size].to(rt.device))
        feats.append(out.feature.float().cpu())
        if out.log_variance is not None:
            log_vars.append(out.log_variance.float().cpu())
    uncertainty = uncertainty_score(torch.cat(log_vars)) if log_vars else None
    source = f"{transformation_path}({features_path})"
    return Embeddings(torch.cat(feats), torch.from_numpy(files[0].labels.astype(np.int64, copy=False)), source,
                      uncertainty)


def model_embeddings(model_path: str, dp: DatasetParams, rt: Runtime) -> Embeddings:
    """Embeddings of the evaluation split (all classes) under the model in ``model_path``.
    Collective under torchrun: every rank calls it and gets the full matrix."""
    from fct.data import build_dataset, dataset_info
    from fct.models import load_model_file
    from fct.retrieval.features import extract_features, extract_features_and_uncertainty

    dataset = build_dataset(dp.name, dp.data_root, "val", augment=False, num_classes=None, options=dp)
    # a foreign (TorchScript) model is first tried on one batch of the data's images
    info = dataset_info(dp.name, dp.data_root, dp)
    model = load_model_file(model_path, map_location="cpu", example_input=dataset[0][0],
                            input_stats=(info.mean, info.std))
    model = rt.prepare_model(model).eval()
    kw = dict(batch_size=max(1, dp.batch_size // dist.world_size()), num_workers=dp.num_workers,
              device=rt.device, amp_dtype=rt.amp_dtype, channels_last=rt.channels_last,
              progress=rt.params.progress)
    transformation = getattr(model, "transformation", None)
    if getattr(transformation, "has_uncertainty", False):
        # A transformed old model with a FastFill head: its uncertainty orders the backfilling.
        feats, labels, log_var = extract_features_and_uncertainty(model, dataset, **kw)
        return Embeddings(feats, labels, model_path, uncertainty_score(log_var))
    feats, labels = extract_features(model, dataset, **kw)
    return Embeddings(feats.float().cpu(), labels.cpu(), model_path)


def embeddings_for(cfg: EvalConfig, side: str, rt: Runtime, cache: dict[str, Embeddings]) -> Embeddings:
    """The embeddings of one side of ``cfg`` (one of :data:`SIDES`): its features file (the
    gallery's through ``gallery_transformation_path`` when given), else its model on the
    evaluation split. ``cache`` (by real path) lets one file serve several sides and cases
    without being read or embedded twice."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; valid: {', '.join(SIDES)}")
    feats_path = getattr(cfg, f"{side}_features_path")
    if side == "gallery" and cfg.gallery_transformation_path is not None:
        assert feats_path is not None  # checked by EvalConfig
        side_path = cfg.gallery_side_info_features_path
        key = "transformed:" + "|".join(os.path.realpath(p) for p in (cfg.gallery_transformation_path, feats_path,
                                                                       side_path or ""))
        if key not in cache:
            cache[key] = transformed_embeddings(feats_path, cfg.gallery_transformation_path, side_path, rt)
        return cache[key]
    if feats_path is not None:
        key = "features:" + os.path.realpath(feats_path)
        if key not in cache:
            cache[key] = load_feature_file(feats_path)
        return cache[key]
    model_path = getattr(cfg, f"{side}_model_path")
    key = "model:" + os.path.realpath(model_path)
    if key not in cache:
        assert cfg.dataset_params is not None  # checked by EvalConfig
        cache[key] = model_embeddings(model_path, cfg.dataset_params, rt)
    return cache[key]


def leave_one_out(cfg: EvalConfig, reference: bool = False) -> bool:
    """Whether a case is leave-one-out, i.e. its queries and gallery are the same images: the
    evaluation split under two models, or one features file on both sides (or whatever
    eval_params.leave_one_out says). ``reference``: the reference case (``reference_query_*``
    against ``reference_gallery_*``) instead of the evaluated one."""
    setting = cfg.eval_params.leave_one_out
    if setting != "auto":
        return bool(setting)
    prefix = "reference_" if reference else ""
    qm, gm = getattr(cfg, f"{prefix}query_model_path"), getattr(cfg, f"{prefix}gallery_model_path")
    if qm is not None and gm is not None:
        return True
    qf, gf = getattr(cfg, f"{prefix}query_features_path"), getattr(cfg, f"{prefix}gallery_features_path")
    return qf is not None and gf is not None and os.path.realpath(qf) == os.path.realpath(gf)


def check_same_images(q: Embeddings, g: Embeddings) -> None:
    """Leave-one-out needs the same images on both sides: refuse query and gallery labels that differ."""
    if len(q.labels) != len(g.labels) or not torch.equal(q.labels, g.labels):
        raise UserError(
            "leave-one-out needs the same images on both sides, but the query and gallery labels differ "
            f"({len(q.labels)} vs {len(g.labels)} items); set eval_params.leave_one_out: false"
        )
