"""``eval.py``: retrieval evaluation of a (query model, gallery model) pair or of stored embeddings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from fct import dist
from fct.config import EvalConfig
from fct.config.loader import to_dict
from fct.errors import ConfigError, UserError
from fct.io import atomic_save_npy, atomic_write_json
from fct.outputs import check_outputs
from fct.regression.flips import flip_report, flips_path
from fct.report import format_table
from fct.retrieval.backfilling import BACKFILL_ORDERS, BackfillInputs, backfilling_curves, check_orderings
from fct.retrieval.embeddings import Embeddings, check_same_images, embeddings_for, leave_one_out
from fct.retrieval.engine import rank_queries
from fct.retrieval.knn import KNN_BACKENDS
from fct.retrieval.metrics import needs_exact_pass, per_class_cmc, retrieval_metrics
from fct.runtime import Runtime, make_runtime


# Config keys of the files eval.py reads.
INPUT_KEYS = ("query_model_path", "gallery_model_path", "query_features_path", "gallery_features_path",
              "gallery_transformation_path", "gallery_side_info_features_path",
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
    ep = cfg.eval_params
    files: dict[str, Optional[str]] = {"results_path": cfg.results_path}
    if ep.backfilling is not None:
        files["eval_params.backfilling_result_path"] = ep.backfilling_result_path
        key = "eval_params.backfilling_plot_path"
        files[key if ep.backfilling_plot_path is not None else f"{key} (its default)"] = \
            _backfilling_plot_path(cfg)
    if _has_reference(cfg):
        files["flips_path" if cfg.flips_path else "flips_path (its default, beside results_path)"] = \
            flips_path(cfg)
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


def evaluate(cfg: EvalConfig, rt: Optional[Runtime] = None,
             cache: Optional[dict[str, Embeddings]] = None, config_path: Optional[str] = None) -> dict:
    """Run one evaluation case; returns the results dict (also written to ``cfg.results_path``).

    config_path: the config file the case came from, refused as an output like every input.
    An undefined metric (mAP when no query has a positive) is None, never NaN. The metrics, the
    per-class results and the flips all come from one exact ranking pass over the queries."""
    check_eval_outputs(cfg, config_path)
    try:  # an unknown name fails before any feature is computed
        KNN_BACKENDS.get(cfg.eval_params.knn_backend)
    except ConfigError as e:
        raise ConfigError(f"eval_params.knn_backend: {e}") from None
    if cfg.eval_params.backfilling is not None:
        check_orderings(_ordering_names(cfg))
    rt = rt or make_runtime(cfg.runtime)
    cache = {} if cache is None else cache
    q = embeddings_for(cfg, "query", rt, cache)
    g = embeddings_for(cfg, "gallery", rt, cache)
    if q.features.shape[1] != g.features.shape[1]:
        raise UserError(
            f"query embeddings are {q.features.shape[1]}-d ({q.source}) but gallery embeddings are "
            f"{g.features.shape[1]}-d ({g.source}): they are not comparable; evaluate the gallery through a "
            "transformation into the query model's space"
        )
    ep = cfg.eval_params
    loo = leave_one_out(cfg)
    if loo:
        check_same_images(q, g)
    if _has_reference(cfg):
        # every rank: extracting the reference models' features is collective under torchrun
        embeddings_for(cfg, "reference_query", rt, cache)
        embeddings_for(cfg, "reference_gallery", rt, cache)
    result: dict = {"case": _case(cfg, q, g, loo)}
    if not dist.is_main():
        return result
    dev = rt.device
    qf, ql, gf, gl = q.features.to(dev), q.labels.to(dev), g.features.to(dev), g.labels.to(dev)
    ranks = None
    if ep.per_class or _has_reference(cfg) or needs_exact_pass(ep.compute_map, ep.knn_backend):
        ranks = rank_queries(qf, ql, gf, gl, metric=ep.distance_metric, exclude_self=loo,
                             compute_map=ep.compute_map, chunk_size=ep.chunk_size,
                             progress=rt.params.progress and ep.verbose)
    metrics = retrieval_metrics(qf, ql, gf, gl, metric=ep.distance_metric, exclude_self=loo, topk=tuple(ep.topk),
                                compute_map=ep.compute_map, knn_backend=ep.knn_backend, chunk_size=ep.chunk_size,
                                ranks=ranks, ann=ep.ann)
    result = {**metrics, **result}
    if ranks is not None and _has_reference(cfg):
        result["flips"] = flip_report(cfg, rt, cache, q, ranks)
        if ep.verbose:
            r = result["flips"]["retrieval"]
            print(f"flips vs reference: retrieval NFR {r['nfr']:.2f}%  PFR {r['pfr']:.2f}%")
    if ranks is not None and ep.per_class:
        result["per_class"] = per_class_cmc(ranks, q.labels, tuple(ep.topk))
    if ep.backfilling is not None:
        result["backfilling"] = _backfilling(cfg, rt, q, g, loo)
    if cfg.results_path:
        atomic_write_json(result, cfg.results_path)
    if ep.verbose:
        _print_results(cfg, result)
    return result


def _print_results(cfg: EvalConfig, result: dict) -> None:
    """The case's metrics as a one-row table on the console; with an approximate k-NN backend,
    its recall@k beside them and a line on the index."""
    ep, case = cfg.eval_params, result["case"]
    cols = [f"top{k}" for k in ep.topk] + (["mAP"] if ep.compute_map else [])
    headers = ["query", "gallery"] + cols
    row = [Path(case["query"]).name, Path(case["gallery"]).name] + [result.get(c) for c in cols]
    ann = result.get("ann")
    if ann is not None:
        recall = ann["recall_at_k"] or {}
        headers += [f"recall@{k}" for k in ep.topk]
        row += [f"{recall[str(k)]:.3f}" if str(k) in recall else None for k in ep.topk]
    print(format_table(headers, [row]))
    if ann is not None:
        params = ", ".join(f"{k} {v}" for k, v in ann["params"].items())
        sampled = (f"recall against exact search on {ann['queries_sampled']} sampled queries "
                   f"({ann['recall_s']:.2f} s)" if ann["recall_at_k"] is not None
                   else "no recall check (eval_params.ann.recall_queries: 0)")
        print(f"approximate k-NN {ann['backend']} on {ann['device']} ({params}): build {ann['build_s']:.2f} s, "
              f"search {ann['search_s']:.2f} s; {sampled}")
        if ann["incomplete_lists"]:
            print(f"{ann['incomplete_lists']} queries got fewer than {max(ep.topk)} neighbours from the index "
                  "(missing ones count as misses; with IVF, raise eval_params.ann.nprobe)")
    if ep.compute_map and result.get("mAP") is None:
        print(f"mAP n/a: none of the {result.get('num_queries')} queries has a positive "
              "in the gallery")
    if cfg.results_path:
        print(f"results written to {cfg.results_path}")


def _case(cfg: EvalConfig, q: Embeddings, g: Embeddings, loo: bool) -> dict:
    """The results' description of the case: what was compared, how, on what data."""
    return {
        "query": q.source,
        "gallery": g.source,
        "distance_metric": cfg.eval_params.distance_metric,
        "leave_one_out": loo,
        "num_queries": int(len(q.labels)),
        "num_gallery": int(len(g.labels)),
        "dataset": to_dict(cfg.dataset_params) if cfg.dataset_params else None,
    }


def _ordering_names(cfg: EvalConfig) -> list[str]:
    # The reference matches ordering names case-insensitively.
    return [name.lower() for name in cfg.eval_params.backfilling_list]


def _backfilling(cfg: EvalConfig, rt: Runtime, q: Embeddings, g: Embeddings, loo: bool) -> dict:
    """Backfilling curves of the gallery ``g`` (h(old)) towards the query model's features of the
    same images (new/new); writes the reference's ``.npy``, a PNG plot, and returns the JSON part."""
    from fct.plots import plot_backfilling

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
