"""The embeddings an evaluation compares: read from a features file or computed by a model on the
evaluation split, looked up by the config key of each side, and the leave-one-out rule."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def load_feature_file(path: str) -> Embeddings:
    """An ``.npz`` with ``features`` float (N, D) and ``labels`` int (N,); optionally
    ``log_variance`` float (N,) or (N, S), a FastFill gallery's predicted uncertainty."""
    if not os.path.isfile(path):
        raise UserError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("features", "labels") if k not in z.files]
            if missing:
                raise UserError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(z.files) or 'none'}")
            feats, labels = z["features"], z["labels"]
            log_var = z["log_variance"] if "log_variance" in z.files else None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/format errors of any kind
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
        raise UserError(f"{path}: 'features' must be a float array (N, D), got {feats.dtype} {feats.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(feats):
        raise UserError(
            f"{path}: 'labels' must be an int array (N,) with N={len(feats)}, got {labels.dtype} {labels.shape}"
        )
    uncertainty = None
    if log_var is not None:
        if log_var.ndim not in (1, 2) or len(log_var) != len(feats) or not np.issubdtype(log_var.dtype, np.floating):
            raise UserError(
                f"{path}: 'log_variance' must be a float array (N,) or (N, S) with N={len(feats)}, "
                f"got {log_var.dtype} {log_var.shape}"
            )
        uncertainty = uncertainty_score(torch.from_numpy(log_var.astype(np.float32).reshape(len(feats), -1)))
    return Embeddings(torch.from_numpy(feats.astype(np.float32, copy=False)),
                      torch.from_numpy(labels.astype(np.int64, copy=False)), path, uncertainty)


def model_embeddings(model_path: str, dp: DatasetParams, rt: Runtime) -> Embeddings:
    """Embeddings of the evaluation split (all classes) under the model in ``model_path``.
    Collective under torchrun: every rank calls it and gets the full matrix."""
    from fct.data import build_dataset
    from fct.models import load_model_file
    from fct.retrieval.features import extract_features, extract_features_and_uncertainty

    dataset = build_dataset(dp.name, dp.data_root, "val", augment=False, num_classes=None)
    # a foreign (TorchScript) model is first tried on one batch of the data's images
    model = load_model_file(model_path, map_location="cpu", example_input=dataset[0][0])
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
    """The embeddings of one side of ``cfg`` (one of :data:`SIDES`): its features file, else its
    model on the evaluation split. ``cache`` (by real path) lets one file serve several sides
    and cases without being read or embedded twice."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; valid: {', '.join(SIDES)}")
    feats_path = getattr(cfg, f"{side}_features_path")
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
