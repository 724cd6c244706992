"""``eval.py``: retrieval evaluation of a (query model, gallery model) pair or of stored embeddings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fct import dist
from fct.config.loader import to_dict
from fct.config import DatasetParams, EvalConfig
from fct.errors import UserError
from fct.io import atomic_save_npy, atomic_write_json
from fct.outputs import check_outputs
from fct.report import format_table
from fct.runtime import Runtime, make_runtime
from fct.transformations.heads import uncertainty_score


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
    """Embeddings of the evaluation split (all classes) under the model in ``model_path``."""
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


def per_class_cmc(per_query: dict[str, torch.Tensor], labels: torch.Tensor,
                  topk: tuple[int, ...]) -> dict[str, dict[str, float | int]]:
    """CMC top-k per query class from the per-query rank of the nearest positive, with the
    class's query count and how many of them have a positive (a query without one is a miss,
    so a class of 0 such queries scores 0 for a reason the counts make visible)."""
    rank = per_query["first_positive_rank"].cpu()
    labels = labels.cpu()
    out: dict[str, dict[str, float | int]] = {}
    for c in torch.unique(labels).tolist():
        r = rank[labels == c]
        entry: dict[str, float | int] = {f"top{k}": 100.0 * ((r >= 1) & (r <= k)).float().mean().item()
                                         for k in topk}
        entry["queries"] = int(len(r))
        entry["queries_with_positives"] = int((r >= 1).sum())
        out[str(c)] = entry
    return out


# Config keys of the files eval.py reads.
INPUT_KEYS = ("query_model_path", "gallery_model_path", "query_features_path", "gallery_features_path",
              "reference_query_model_path", "reference_gallery_model_path",
              "reference_query_features_path", "reference_gallery_features_path")


def _has_reference(cfg: EvalConfig) -> bool:
    return cfg.reference_query_model_path is not None or cfg.reference_query_features_path is not None


def _backfilling_plot_path(cfg: EvalConfig) -> Optional[str]:
    """The backfilling plot: eval_params.backfilling_plot_path, else beside the reference's .npy
    (same stem, .png), else beside the results (<stem>_backfilling.png), else none."""
    ep = cfg.eval_params
    if ep.backfilling_plot_path is not None:
        return ep.backfilling_plot_path
    base = ep.backfilling_result_path or cfg.results_path
    if not base:
        return None
    return os.path.splitext(base)[0] + ("" if ep.backfilling_result_path else "_backfilling") + ".png"


def output_files(cfg: EvalConfig) -> dict[str, Optional[str]]:
    """Every file an evaluation of ``cfg`` writes, by the config key that sets it (None: not written)."""
    from fct.regression.flips import _default_flips_path

    ep = cfg.eval_params
    files: dict[str, Optional[str]] = {"results_path": cfg.results_path}
    if ep.backfilling is not None:
        files["eval_params.backfilling_result_path"] = ep.backfilling_result_path
        key = "eval_params.backfilling_plot_path"
        files[key if ep.backfilling_plot_path is not None else f"{key} (its default)"] = \
            _backfilling_plot_path(cfg)
    if _has_reference(cfg):
        files["flips_path" if cfg.flips_path else "flips_path (its default, beside results_path)"] = \
            _default_flips_path(cfg)
    return files


def check_eval_outputs(cfg: EvalConfig, config_path: Optional[str] = None) -> None:
    """Refuse, before any work, an output that is an input (it would be destroyed), a directory,
    unwritable, or the same file as another output (one would silently replace the other)."""
    files = output_files(cfg)
    inputs: dict[str, Optional[str]] = {k: getattr(cfg, k) for k in INPUT_KEYS}
    if config_path is not None:
        inputs["--config"] = config_path
    check_outputs(files=files, inputs=inputs)
    seen: dict[Path, str] = {}
    for key, path in files.items():
        if not path:
            continue
        real = Path(path).resolve()
        if real in seen:
            raise UserError(f"{key} and {seen[real]} are the same file ({path}); "
                            "give each output its own path")
        seen[real] = key


def _side(cfg: EvalConfig, side: str, rt: Runtime, cache: dict[str, Embeddings]) -> Embeddings:
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


def _leave_one_out(cfg: EvalConfig, q: Embeddings, g: Embeddings) -> bool:
    """Leave-one-out when queries and gallery are the same images: the evaluation split under two
    models, or one features file on both sides (or when eval_params.leave_one_out says so)."""
    setting = cfg.eval_params.leave_one_out
    if setting != "auto":
        same = bool(setting)
    elif cfg.query_model_path is not None and cfg.gallery_model_path is not None:
        same = True
    else:
        same = (
            cfg.query_features_path is not None
            and cfg.gallery_features_path is not None
            and os.path.realpath(cfg.query_features_path) == os.path.realpath(cfg.gallery_features_path)
        )
    if same and (len(q.labels) != len(g.labels) or not torch.equal(q.labels, g.labels)):
        raise UserError(
            "leave-one-out needs the same images on both sides, but the query and gallery labels differ "
            f"({len(q.labels)} vs {len(g.labels)} items); set eval_params.leave_one_out: false"
        )
    return same


def evaluate(cfg: EvalConfig, rt: Optional[Runtime] = None,
             cache: Optional[dict[str, Embeddings]] = None, config_path: Optional[str] = None) -> dict:
    """Run one evaluation case; returns the results dict (also written to ``cfg.results_path``).

    config_path: the config file the case came from, refused as an output like every input.
    An undefined metric (mAP when no query has a positive) is None, never NaN."""
    from fct.retrieval import retrieval_metrics

    check_eval_outputs(cfg, config_path)
    if cfg.eval_params.backfilling is not None:
        from fct.retrieval.backfilling import check_orderings

        check_orderings(_ordering_names(cfg))  # before any feature is computed
    rt = rt or make_runtime(cfg.runtime)
    cache = {} if cache is None else cache
    q = _side(cfg, "query", rt, cache)
    g = _side(cfg, "gallery", rt, cache)
    if q.features.shape[1] != g.features.shape[1]:
        raise UserError(
            f"query embeddings are {q.features.shape[1]}-d ({q.source}) but gallery embeddings are "
            f"{g.features.shape[1]}-d ({g.source}): they are not comparable; evaluate the gallery through a "
            "transformation into the query model's space"
        )
    ep = cfg.eval_params
    loo = _leave_one_out(cfg, q, g)
    metrics: dict = {}
    if dist.is_main():
        metrics = retrieval_metrics(
            q.features.to(rt.device), q.labels.to(rt.device), g.features.to(rt.device), g.labels.to(rt.device),
            metric=ep.distance_metric, exclude_self=loo, topk=tuple(ep.topk), compute_map=ep.compute_map,
            knn_backend=ep.knn_backend, chunk_size=ep.chunk_size, progress=rt.params.progress and ep.verbose,
        )
    result = {
        **{k: v for k, v in metrics.items()},
        "case": {
            "query": q.source,
            "gallery": g.source,
            "distance_metric": ep.distance_metric,
            "leave_one_out": loo,
            "num_queries": int(len(q.labels)),
            "num_gallery": int(len(g.labels)),
            "dataset": to_dict(cfg.dataset_params) if cfg.dataset_params else None,
        },
    }
    if _has_reference(cfg):
        # every rank: extracting the reference models' features is collective under torchrun
        _side(cfg, "reference_query", rt, cache)
        _side(cfg, "reference_gallery", rt, cache)
        if dist.is_main():
            from fct.regression.flips import flip_report

            result["flips"] = flip_report(cfg, rt, cache, q, g, loo)
            if ep.verbose:
                r = result["flips"]["retrieval"]
                print(f"flips vs reference: retrieval NFR {r['nfr']:.2f}%  PFR {r['pfr']:.2f}%")
    if ep.per_class and dist.is_main():
        from fct.retrieval.metrics import retrieval_per_query

        per_q = retrieval_per_query(q.features.to(rt.device), q.labels.to(rt.device), g.features.to(rt.device),
                                    g.labels.to(rt.device), metric=ep.distance_metric, exclude_self=loo,
                                    compute_map=False, chunk_size=ep.chunk_size)
        result["per_class"] = per_class_cmc(per_q, q.labels, tuple(ep.topk))
    if ep.backfilling is not None and dist.is_main():
        result["backfilling"] = _backfilling(cfg, rt, q, g, loo)
    if dist.is_main():
        if cfg.results_path:
            atomic_write_json(result, cfg.results_path)
        if ep.verbose:
            cols = [f"top{k}" for k in ep.topk] + (["mAP"] if ep.compute_map else [])
            print(format_table(["query", "gallery"] + cols,
                               [[Path(q.source).name, Path(g.source).name] + [result.get(c) for c in cols]]))
            if ep.compute_map and result.get("mAP") is None:
                print(f"mAP n/a: none of the {result.get('num_queries')} queries has a positive "
                      "in the gallery")
            if cfg.results_path:
                print(f"results written to {cfg.results_path}")
    return result


def _ordering_names(cfg: EvalConfig) -> list[str]:
    # The reference matches ordering names case-insensitively.
    return [name.lower() for name in cfg.eval_params.backfilling_list]


def _backfilling(cfg: EvalConfig, rt: Runtime, q: Embeddings, g: Embeddings, loo: bool) -> dict:
    """Backfilling curves of the gallery ``g`` (h(old)) towards the query model's features of the
    same images (new/new); writes the reference's ``.npy``, a PNG plot, and returns the JSON part."""
    from fct.plots import plot_backfilling
    from fct.retrieval.backfilling import BACKFILL_ORDERS, BackfillInputs, backfilling_curves

    ep = cfg.eval_params
    assert ep.backfilling is not None
    if not loo:
        raise UserError(
            "eval_params.backfilling needs the query and gallery sides to be the same images (the gallery's "
            "new-model features are the query model's features of those images); this case is not leave-one-out "
            "(eval_params.leave_one_out)"
        )
    inputs = BackfillInputs(new=q.features, old=g.features, uncertainty=g.uncertainty, metric=ep.distance_metric,
                            seed=cfg.seed, random_seeds=ep.backfilling_random_seeds, gallery_source=g.source)
    orders = {name: BACKFILL_ORDERS.get(name)(inputs) for name in _ordering_names(cfg)}
    curves = backfilling_curves(
        q.features.to(rt.device), q.labels.to(rt.device), q.features.to(rt.device), g.features.to(rt.device),
        g.labels.to(rt.device), orders, steps=ep.backfilling, metric=ep.distance_metric, exclude_self=loo,
        topk=tuple(ep.topk), compute_map=ep.compute_map, chunk_size=ep.chunk_size,
        progress=rt.params.progress and ep.verbose,
    )
    out: dict = {"steps": ep.backfilling, "random_seeds": ep.backfilling_random_seeds,
                 "orderings": {name: c.to_dict() for name, c in curves.items()}}
    if ep.backfilling_result_path:
        # The reference's file: {ordering: {'CMC-top1': [...], 'CMC-top5': [...], 'mAP': [...]}}, fractions
        # in [0, 1] (the mean over seeds for random); read it with np.load(path, allow_pickle=True).item().
        ref = {name: {(m if m == "mAP" else f"CMC-{m}"): (c.mean(m) / 100.0).tolist() for m in c.values}
               for name, c in curves.items()}
        atomic_save_npy(np.array(ref, dtype=object), ep.backfilling_result_path)
        out["result_path"] = ep.backfilling_result_path
    plot_path = _backfilling_plot_path(cfg)
    if plot_path:
        plot_backfilling(curves, plot_path, title=f"new queries; gallery {Path(g.source).name} -> new")
        out["plot_path"] = plot_path
    if ep.verbose:
        cols = list(next(iter(curves.values())).values)
        rows = []
        for name, c in curves.items():
            rows.append([name] + [c.auc(m).mean() for m in cols] + [c.auc(m, "trapezoid").mean() for m in cols])
        print(f"backfilling, {ep.backfilling + 2} points (AUC: mean of the points | trapezoid)")
        print(format_table(["ordering"] + [f"AUC {m}" for m in cols] + [f"trapz {m}" for m in cols], rows))
    return out
