"""Negative and positive flips between a reference (old) model and an updated (new) one (protocols.md §7).

A sample is *right* under a model when the model's prediction is its label (classification) or
when its top-1 neighbour has its label (retrieval: ``first_positive_rank == 1`` in the
:class:`fct.retrieval.engine.QueryRanks` of the exact pass, pessimistic ties). Then

- NFR = fraction of samples right under the old model and wrong under the new one,
- PFR = fraction wrong under the old and right under the new,
- relative NFR = NFR / ((1 - ER_old) * ER_new), ER the error rates: the NFR divided by the one
  expected if the two models erred independently (1 = no better than chance, < 1 = consistent).

Rates are reported in percent (as CMC and accuracy elsewhere); the relative NFR is a ratio
(None when undefined: a perfect new model or a useless old one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fct.config import EvalConfig
from fct.errors import UserError
from fct.io import atomic_save_npz
from fct.retrieval.embeddings import Embeddings, embeddings_for, leave_one_out
from fct.retrieval.engine import QueryRanks, rank_queries
from fct.runtime import Runtime


def _as_bool(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {a.shape}")
    return a.astype(bool)


def flip_rates(old_correct: Any, new_correct: Any) -> dict[str, Any]:
    """Flips from per-sample correctness, old_correct / new_correct bool (N,) in the same order.

    Returns ``{'nfr', 'pfr', 'old_error', 'new_error'}`` in percent, ``'relative_nfr'`` (ratio or
    None), ``'num_samples'``, ``'num_negative_flips'``, ``'num_positive_flips'`` and the sample
    indices ``'negative_flips'`` / ``'positive_flips'`` (int64 arrays, ascending).
    """
    old, new = _as_bool(old_correct, "old_correct"), _as_bool(new_correct, "new_correct")
    if old.shape != new.shape:
        raise ValueError(f"old and new results cover different samples: {old.shape[0]} vs {new.shape[0]}")
    n = old.shape[0]
    if n == 0:
        raise ValueError("no samples to compare")
    neg = np.flatnonzero(old & ~new).astype(np.int64)
    pos = np.flatnonzero(~old & new).astype(np.int64)
    nfr, pfr = len(neg) / n, len(pos) / n
    er_old, er_new = 1.0 - old.mean(), 1.0 - new.mean()
    denom = (1.0 - er_old) * er_new
    return {
        "nfr": 100.0 * nfr,
        "pfr": 100.0 * pfr,
        "relative_nfr": float(nfr / denom) if denom > 0 else None,
        "old_error": 100.0 * float(er_old),
        "new_error": 100.0 * float(er_new),
        "num_samples": int(n),
        "num_negative_flips": int(len(neg)),
        "num_positive_flips": int(len(pos)),
        "negative_flips": neg,
        "positive_flips": pos,
    }


def classification_flips(old_pred: Any, new_pred: Any, labels: Any) -> dict[str, Any]:
    """Flips of two classifiers: predicted classes old_pred, new_pred (N,) against labels (N,)."""
    lab = torch.as_tensor(labels).cpu()
    old = torch.as_tensor(old_pred).cpu() == lab
    new = torch.as_tensor(new_pred).cpu() == lab
    return flip_rates(old, new)


def retrieval_flips(old_rank: Any, new_rank: Any) -> dict[str, Any]:
    """Flips of two retrieval cases over the same queries, from each case's per-query
    ``first_positive_rank`` (N,) (1-based; 0 = no positive in the gallery, always wrong)."""
    old = torch.as_tensor(old_rank).cpu() == 1
    new = torch.as_tensor(new_rank).cpu() == 1
    return flip_rates(old, new)


def summary(flips: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a :func:`flip_rates` result (no index arrays)."""
    return {k: v for k, v in flips.items() if k not in ("negative_flips", "positive_flips")}


def masked_predictions(logits: torch.Tensor, num_classes: Optional[int]) -> torch.Tensor:
    """Predicted class (N,) among the first ``num_classes`` outputs of logits (N, C) (None: all)."""
    if num_classes is not None:
        logits = logits[:, :num_classes]
    return logits.argmax(1)


# --------------------------------------------------------------------------- eval.py integration


def _model_classifier_predictions(model_path: str, emb: Embeddings) -> Optional[torch.Tensor]:
    """The model's own predictions (N,) from its cached embeddings: its bias-free linear
    classifier applied to them, among the classes it was trained on (model file meta
    ``trained_classes``; all outputs when absent). None for a model without a classifier."""
    from fct.models import is_torchscript_file, load_model_file, read_model_file

    model = load_model_file(model_path, map_location="cpu")
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, torch.nn.Linear) or classifier.in_features != emb.features.shape[1]:
        return None
    trained = None
    if not is_torchscript_file(model_path):
        trained = read_model_file(model_path)["meta"].get("trained_classes")
    with torch.no_grad():
        logits = classifier(emb.features.float())
    return masked_predictions(logits, trained if isinstance(trained, int) else None)


def flips_path(cfg: EvalConfig) -> Optional[str]:
    """Where the flipped query indices go: ``cfg.flips_path``, else ``<results_path stem>_flips.npz``
    beside the results, else nowhere (None)."""
    if cfg.flips_path:
        return cfg.flips_path
    if cfg.results_path:
        p = Path(cfg.results_path)
        return str(p.with_name(p.stem + "_flips.npz"))
    return None


def flip_report(cfg: EvalConfig, rt: Runtime, cache: dict[str, Embeddings], q: Embeddings,
                ranks: QueryRanks) -> dict[str, Any]:
    """Flips of the evaluated case (queries ``q``, their :class:`QueryRanks` ``ranks`` against the
    evaluated gallery) relative to the reference case of ``cfg`` (``reference_query_*`` against
    ``reference_gallery_*``), for eval.py.

    Retrieval: top-1 correctness per query under each case. Classification (when both query
    sides are model files with a classifier): each query model's own prediction. ``cache``: the
    embeddings cache of :func:`fct.retrieval.embeddings.embeddings_for`. The flipped indices
    (positions in the query set) go to :func:`flips_path` as an ``.npz``. Returns the dict to
    store under ``results['flips']``.
    """
    rq = embeddings_for(cfg, "reference_query", rt, cache)
    rg = embeddings_for(cfg, "reference_gallery", rt, cache)
    if len(rq.labels) != len(q.labels) or not torch.equal(rq.labels, q.labels):
        raise UserError(
            f"flips need the same queries in both cases, but the reference queries ({rq.source}, "
            f"{len(rq.labels)} items) differ from the evaluated ones ({q.source}, {len(q.labels)} items)"
        )
    if rq.features.shape[1] != rg.features.shape[1]:
        raise UserError(f"reference query embeddings are {rq.features.shape[1]}-d ({rq.source}) but "
                        f"reference gallery embeddings are {rg.features.shape[1]}-d ({rg.source})")
    ep = cfg.eval_params
    dev = rt.device
    ref_loo = leave_one_out(cfg, reference=True)
    ref_rank = rank_queries(rq.features.to(dev), rq.labels.to(dev), rg.features.to(dev), rg.labels.to(dev),
                            metric=ep.distance_metric, exclude_self=ref_loo, compute_map=False,
                            chunk_size=ep.chunk_size).first_positive_rank.cpu()
    ret = retrieval_flips(ref_rank, ranks.first_positive_rank.cpu())
    report: dict[str, Any] = {
        "reference": {"query": rq.source, "gallery": rg.source, "leave_one_out": ref_loo},
        "retrieval": summary(ret),
        "classification": None,
    }
    arrays = {"retrieval_negative_flips": ret["negative_flips"],
              "retrieval_positive_flips": ret["positive_flips"]}
    if cfg.query_model_path is not None and cfg.reference_query_model_path is not None:
        new_pred = _model_classifier_predictions(cfg.query_model_path, q)
        old_pred = _model_classifier_predictions(cfg.reference_query_model_path, rq)
        if new_pred is not None and old_pred is not None:
            cls = classification_flips(old_pred, new_pred, q.labels)
            report["classification"] = summary(cls)
            arrays["classification_negative_flips"] = cls["negative_flips"]
            arrays["classification_positive_flips"] = cls["positive_flips"]
    path = flips_path(cfg)
    if path:
        atomic_save_npz(path, labels=q.labels.numpy(), **arrays)
    report["indices_path"] = path
    return report
