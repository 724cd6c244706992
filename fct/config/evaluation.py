"""``eval.py`` config: retrieval of a query side against a gallery side (reference schema, protocols.md §9,
plus extensions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from fct.config.common import DatasetParams, RuntimeParams
from fct.errors import ConfigError


@dataclass(frozen=True)
class EvalParams:
    """How retrieval is measured (``eval_params``)."""

    # the reference implementation's spellings of keys -> field names
    _aliases: ClassVar[dict[str, str]] = {"distance_metric_name": "distance_metric"}

    distance_metric: Literal["l2", "cosine"] = "l2"  # distance ranking the gallery for each query
    verbose: bool = True  # print progress and result tables
    compute_map: bool = True  # also compute mAP (besides the CMC top-k)
    per_class: bool = False  # per-class CMC top-1/top-5 in the results
    topk: list[int] = field(default_factory=lambda: [1, 5])  # extension
    knn_backend: str = "torch"  # extension: torch (exact, chunked) | faiss
    chunk_size: Optional[int] = None  # extension: queries per chunk; None: from a memory budget
    # extension: 'auto' = leave-one-out when both sides are the same images (two models on the
    # evaluation split, or one features file on both sides)
    leave_one_out: Union[Literal["auto"], bool] = "auto"
    # backfilling (FastFill): B intermediate steps (B + 2 curve points); None: no backfilling curve
    backfilling: Optional[int] = None
    # backfilling orderings: random, sigma, distance
    backfilling_list: list[str] = field(default_factory=lambda: ["random"])
    backfilling_result_path: Optional[str] = None  # the reference's .npy of the curves; None: not written
    backfilling_random_seeds: int = 5  # extension: permutations the random order is averaged over
    backfilling_plot_path: Optional[str] = None  # extension: default beside the results

    def __post_init__(self) -> None:
        if not self.topk or any(k < 1 for k in self.topk):
            raise ConfigError(f"eval_params.topk must be a non-empty list of positive ints, got {self.topk}")
        if self.backfilling is not None and self.backfilling < 0:
            raise ConfigError(f"eval_params.backfilling must be >= 0 intermediate steps, got {self.backfilling}")
        if self.backfilling_random_seeds < 1:
            raise ConfigError(
                f"eval_params.backfilling_random_seeds must be >= 1, got {self.backfilling_random_seeds}"
            )
        if self.backfilling is not None and not self.backfilling_list:
            raise ConfigError("eval_params.backfilling_list is empty; name at least one of random, sigma, distance")


@dataclass(frozen=True)
class EvalConfig:
    """``eval.py`` config: two models (query, gallery) on the evaluation split, or precomputed
    embeddings (``query_features_path`` / ``gallery_features_path``, ``.npz`` with ``features``
    and ``labels``)."""

    gallery_model_path: Optional[str] = None  # model embedding the gallery (e.g. the transformed old model)
    query_model_path: Optional[str] = None  # model embedding the queries
    query_features_path: Optional[str] = None  # extension: precomputed query embeddings (.npz)
    gallery_features_path: Optional[str] = None  # extension: precomputed gallery embeddings (.npz)
    # extension: a transformation file (h) applied to gallery_features_path (old-model embeddings): the
    # gallery is h(old, side), with h's uncertainty for FastFill backfilling; no image model is run
    gallery_transformation_path: Optional[str] = None
    # extension: side-information embeddings of the gallery images (.npz) for gallery_transformation_path,
    # paired with gallery_features_path by ids (or position)
    gallery_side_info_features_path: Optional[str] = None
    eval_params: EvalParams = field(default_factory=EvalParams)  # how retrieval is measured
    dataset_params: Optional[DatasetParams] = None  # the evaluation split; needed when a side is a model
    results_path: Optional[str] = None  # extension: JSON results
    seed: int = 0  # extension (random backfilling order)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # extension
    # extension: a reference case (e.g. old/old) to count negative/positive flips against
    # (fct/regression/flips.py); its flipped query indices go to flips_path (.npz, default
    # <results_path stem>_flips.npz)
    reference_query_model_path: Optional[str] = None
    reference_gallery_model_path: Optional[str] = None  # extension: the reference case's gallery model
    reference_query_features_path: Optional[str] = None  # extension: reference query embeddings (.npz)
    reference_gallery_features_path: Optional[str] = None  # extension: reference gallery embeddings (.npz)
    flips_path: Optional[str] = None  # extension: where the flipped query indices go (.npz)

    def __post_init__(self) -> None:
        self._check_reference()
        for side in ("query", "gallery"):
            model = getattr(self, f"{side}_model_path")
            feats = getattr(self, f"{side}_features_path")
            if model is not None and feats is not None:
                raise ConfigError(f"give {side}_model_path or {side}_features_path, not both")
            if model is None and feats is None:
                raise ConfigError(f"missing {side}_model_path (or {side}_features_path)")
            if model is not None and self.dataset_params is None:
                raise ConfigError(f"{side}_model_path needs dataset_params (the evaluation split)")
        if self.gallery_transformation_path is not None and self.gallery_features_path is None:
            raise ConfigError("gallery_transformation_path applies to gallery_features_path (stored old-model "
                              "embeddings); with gallery_model_path use the transformed old model file instead")
        if self.gallery_side_info_features_path is not None and self.gallery_transformation_path is None:
            raise ConfigError("gallery_side_info_features_path is h's side input; it needs gallery_transformation_path")

    def _check_reference(self) -> None:
        given = {side: (getattr(self, f"reference_{side}_model_path"), getattr(self, f"reference_{side}_features_path"))
                 for side in ("query", "gallery")}
        if all(m is None and f is None for m, f in given.values()):
            if self.flips_path is not None:
                raise ConfigError("flips_path needs a reference case (reference_query_model_path and "
                                  "reference_gallery_model_path, or their *_features_path)")
            return
        for side, (model, feats) in given.items():
            if model is not None and feats is not None:
                raise ConfigError(f"give reference_{side}_model_path or reference_{side}_features_path, not both")
            if model is None and feats is None:
                raise ConfigError(f"a reference case needs reference_{side}_model_path (or "
                                  f"reference_{side}_features_path) too")
            if model is not None and self.dataset_params is None:
                raise ConfigError(f"reference_{side}_model_path needs dataset_params (the evaluation split)")
