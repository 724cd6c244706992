"""``compat.py`` config: a chain of embedding versions and how each one relates to older ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from fct.config.common import DatasetParams, RuntimeParams
from fct.config.evaluation import APPROXIMATE_KNN_BACKENDS, EvalParams
from fct.errors import ConfigError


@dataclass(frozen=True)
class ChainEdge:
    """Embeddings of ``source`` -> the space of ``target``: ``identity`` (one space, e.g. BCT) or a
    ``transformation`` file (an FCT h old -> new, or a backward map new -> old)."""

    source: str  # version id whose embeddings are mapped
    target: str  # version id whose space they are mapped into
    kind: Literal["identity", "transformation"]  # one shared space, or a map file
    path: Optional[str] = None  # the map file (a 'transformation' model file); identity edges have none


@dataclass(frozen=True)
class ChainVersion:
    """One embedding version of the chain, as it is entered in the embedding registry."""

    id: str  # version id, unique in the chain
    model_path: str  # the version's model file
    change: Literal["major", "minor", "patch"] = "patch"  # a minor or patch change keeps the embedding width
    parent: Optional[str] = None  # the version this one updates; None: none
    compatible_with: list[str] = field(default_factory=list)  # older versions it claims to be comparable with
    data: Optional[str] = None  # what it was trained on (free text, kept in the registry)
    edges: list[ChainEdge] = field(default_factory=list)  # maps joining it to older versions
    # a model of this version trained without any compatibility constraint: M*[i][i] of the update gain
    reference_model_path: Optional[str] = None
    # stored embeddings of the evaluation split by model_path (python -m fct.embed), used instead of
    # running the model; every version's file must hold the same images in the same order
    features_path: Optional[str] = None


@dataclass(frozen=True)
class MatrixEvalParams(EvalParams):
    """``eval_params`` of a compatibility matrix: those of eval.py, with exact search only (every
    cell reports mAP, which an approximate index cannot give)."""

    def __post_init__(self) -> None:
        if self.knn_backend in APPROXIMATE_KNN_BACKENDS or self.ann is not None:
            raise ConfigError(f"eval_params.knn_backend {self.knn_backend!r}: a compatibility matrix scores every "
                              "cell by exact search (mAP included); use knn_backend torch or faiss, without "
                              "eval_params.ann")
        super().__post_init__()


@dataclass(frozen=True)
class ChainConfig:
    """Versions oldest first. ``registry_dir`` receives the embedding registry built from them (rebuilt
    on every run), ``output_dir`` the matrices (JSON, heat-map PNGs) and 2-D projections."""

    versions: list[ChainVersion]  # oldest first, at least two
    dataset_params: DatasetParams  # the evaluation split (all classes, leave-one-out)
    registry_dir: str  # the embedding registry built from the versions
    output_dir: str  # matrices (JSON, heat-map PNGs) and 2-D projections
    # retrieval settings of every cell of the matrix (no backfilling)
    eval_params: MatrixEvalParams = field(default_factory=MatrixEvalParams)
    headline_metric: Literal["top1", "top5", "mAP"] = "top1"  # the metric the criterion/AC lead with
    projection: bool = True  # 2-D projection of each pair of consecutive versions
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # how the run executes

    def __post_init__(self) -> None:
        ids = [v.id for v in self.versions]
        if len(ids) < 2:
            raise ConfigError(f"versions: a chain needs at least two versions, got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"versions: duplicate version ids in {ids}")
        for k, v in enumerate(self.versions):
            older = set(ids[:k])
            for e in v.edges:
                if v.id not in (e.source, e.target) or ({e.source, e.target} - {v.id}) - older:
                    raise ConfigError(f"versions[{k}] ({v.id}): edge {e.source} -> {e.target} must join "
                                      f"{v.id} to an older version ({', '.join(ids[:k]) or 'none'})")
                if (e.kind == "transformation") != (e.path is not None):
                    raise ConfigError(f"versions[{k}] ({v.id}): edge {e.source} -> {e.target}: a transformation "
                                      "edge needs a path, an identity edge has none")
            for other in v.compatible_with:
                if other not in older:
                    raise ConfigError(f"versions[{k}] ({v.id}): compatible_with names {other!r}, not an older version")
        if self.eval_params.backfilling is not None:
            raise ConfigError("eval_params.backfilling does not apply to a compatibility matrix; remove it")

