"""``eval.py`` config: retrieval of a query side against a gallery side (reference schema, protocols.md §9,
plus extensions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from fct.config.common import DatasetParams, RuntimeParams
from fct.errors import ConfigError

# k-NN backends that search an approximate index (fct/retrieval/ann.py): they give CMC top-k and
# recall@k against exact search, never mAP (its exact pass over the whole gallery is what they avoid)
APPROXIMATE_KNN_BACKENDS = ("faiss_ivf_flat", "faiss_ivf_pq", "faiss_hnsw")


@dataclass(frozen=True)
class AnnParams:
    """Extension: the approximate FAISS index of ``knn_backend`` faiss_ivf_flat, faiss_ivf_pq or
    faiss_hnsw (``eval_params.ann``); each backend reads only its own keys, the results' ``ann``
    block lists the values it used. Recall@k is measured against the exact search on a seeded
    sample of the queries."""

    # IVF: inverted lists (k-means cells); null: 4 * sqrt(N) for a gallery of N, at most N / 39
    # (faiss wants 39 training vectors per cell)
    nlist: Optional[int] = None
    # IVF: cells searched per query (more: higher recall, slower); at most nlist (with nlist null,
    # capped at the derived nlist)
    nprobe: int = 16
    # IVF: gallery vectors the k-means (and PQ) training sees, a seeded sample; null: min(N, 64 * nlist)
    train_size: Optional[int] = None
    # IVF-PQ: sub-quantizers per vector (bytes per code at 8 bits); must divide the embedding width;
    # null: the largest divisor of the width that is at most width / 4
    pq_m: Optional[int] = None
    pq_bits: int = 8  # IVF-PQ: bits per sub-quantizer code (1-16); training needs 2**pq_bits vectors
    # IVF-PQ: re-rank refine_factor * k candidates by their exact distances to the stored float32
    # vectors (faiss IndexRefineFlat: recall near IVF-Flat's, memory + 4 * width bytes per vector,
    # exact distances returned); 1: no re-ranking, the quantised distances
    refine_factor: int = 1
    hnsw_m: int = 32  # HNSW: links per node (memory grows by about 8 * hnsw_m bytes per vector)
    ef_construction: int = 40  # HNSW: candidate list while building (larger: better graph, slower build)
    ef_search: int = 128  # HNSW: candidate list while searching (faiss uses at least k)
    # queries sampled (seeded) for recall@k against the exact search; 0: no recall check
    recall_queries: int = 1000
    seed: int = 0  # the recall sample, the training sample and faiss's k-means

    def __post_init__(self) -> None:
        positive = {"nprobe": self.nprobe, "pq_bits": self.pq_bits, "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search, "nlist": self.nlist, "train_size": self.train_size,
                    "pq_m": self.pq_m, "refine_factor": self.refine_factor}
        for key, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"eval_params.ann.{key} must be >= 1, got {value}")
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ConfigError(f"eval_params.ann.nprobe={self.nprobe} exceeds eval_params.ann.nlist={self.nlist}: "
                              "a query cannot search more cells than there are")
        if self.pq_bits > 16:
            raise ConfigError(f"eval_params.ann.pq_bits must be at most 16, got {self.pq_bits}")
        if self.hnsw_m < 2:
            raise ConfigError(f"eval_params.ann.hnsw_m must be >= 2, got {self.hnsw_m}")
        if self.recall_queries < 0:
            raise ConfigError(f"eval_params.ann.recall_queries must be >= 0 (0: no recall check), "
                              f"got {self.recall_queries}")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"eval_params.ann.seed must be in [0, 2**31), got {self.seed}")


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
    # extension: torch (exact, chunked) | faiss (exact, flat index) | faiss_ivf_flat | faiss_ivf_pq |
    # faiss_hnsw (approximate: CMC top-k and recall@k only, so they need compute_map false)
    knn_backend: str = "torch"
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
    # extension: the index of an approximate knn_backend; null: its defaults (given with another
    # backend it is refused)
    ann: Optional[AnnParams] = None

    def __post_init__(self) -> None:
        if self.knn_backend in APPROXIMATE_KNN_BACKENDS and self.compute_map:
            # Full mAP ranks every gallery item for every query: the exact pass the index avoids.
            raise ConfigError(
                f"eval_params.compute_map needs the exact pass over the whole gallery, which "
                f"knn_backend {self.knn_backend!r} is meant to avoid: set eval_params.compute_map: false "
                "(CMC top-k and recall@k come from the index), or use knn_backend torch or faiss (exact)"
            )
        if self.ann is not None and self.knn_backend not in APPROXIMATE_KNN_BACKENDS:
            raise ConfigError(f"eval_params.ann applies to the approximate backends "
                              f"({', '.join(APPROXIMATE_KNN_BACKENDS)}), not to knn_backend {self.knn_backend!r}")
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
