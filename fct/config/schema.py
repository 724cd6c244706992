"""Config sections. Field names follow the reference FCT/FastFill schema (protocols.md §9);
fields marked *extension* are ours and have defaults, so reference configs load unchanged.

``dataset_params.batch_size`` is the **global** batch: under ``torchrun`` with W processes each
process takes ``batch_size / W`` samples per step, so a config means the same optimisation on one
GPU or eight (the learning rate needs no rescaling when the process count changes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from fct.errors import ConfigError
from fct.ssl.augment import ViewAugParams


@dataclass(frozen=True)
class ArchParams:
    """Backbone architecture (``arch_params`` of a backbone config)."""

    arch: str
    num_classes: int  # width of the classifier layer (may exceed the classes trained on)
    embedding_dim: Optional[int] = None  # None: the architecture's natural width
    last_nonlin: bool = True  # ReLU on the embedding (reference behaviour)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"arch_params.num_classes must be >= 1, got {self.num_classes}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ConfigError(f"arch_params.embedding_dim must be >= 1, got {self.embedding_dim}")


@dataclass(frozen=True)
class OptimizerParams:
    algorithm: Literal["sgd", "adam", "adamw"]
    lr: float
    weight_decay: float = 0.0
    no_bn_decay: bool = False  # no weight decay on BatchNorm parameters and biases
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer_params.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer_params.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class DatasetParams:
    name: str
    data_root: str = ""
    num_classes: Optional[int] = None  # train on labels 0..num_classes-1 only; None: all
    num_workers: int = 4
    batch_size: int = 256  # global batch, split over processes
    # extension: train on this fraction of each class's training images (a class-balanced selection
    # fixed by train_fraction_seed, not by the run seed: "old data" for an added-data update)
    train_fraction: Optional[float] = None
    train_fraction_seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"dataset_params.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"dataset_params.num_workers must be >= 0, got {self.num_workers}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"dataset_params.num_classes must be >= 1, got {self.num_classes}")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"dataset_params.train_fraction must be in (0, 1], got {self.train_fraction}")


@dataclass(frozen=True)
class LrPolicyParams:
    """Learning-rate schedule. ``epochs`` and ``lr`` repeat top-level values in reference
    configs: they may be omitted here, and when given they must agree."""

    algorithm: Literal["cosine_lr", "constant_lr", "multistep_lr"] = "cosine_lr"
    warmup_length: int = 0  # epochs of linear warm-up
    epochs: Optional[int] = None
    lr: Optional[float] = None
    lr_gamma: float = 0.1  # multistep: decay factor
    # multistep: an int decays every that many epochs (reference); a list gives the milestones
    lr_adjust: Union[int, list[int], None] = None
    per_step: bool = True  # extension: update the lr every step (fractional epoch), not per epoch

    def __post_init__(self) -> None:
        if self.warmup_length < 0:
            raise ConfigError(f"lr_policy_params.warmup_length must be >= 0, got {self.warmup_length}")
        if self.algorithm == "multistep_lr" and self.lr_adjust is None:
            raise ConfigError("lr_policy_params.lr_adjust is required for multistep_lr")


@dataclass(frozen=True)
class RuntimeParams:
    """Extension: how a run executes (none of it changes the maths)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a gradient scaler
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = True  # under DDP on GPU only
    progress: bool = True  # progress bars (rank 0 only)
    tensorboard: bool = True
    deterministic: bool = False


def _check_twice(section: str, name: str, nested: object, top: object) -> None:
    if nested is not None and top is not None and nested != top:
        raise ConfigError(
            f"{section}.{name}={nested!r} disagrees with {name}={top!r}; give it once or make them equal"
        )


@dataclass(frozen=True)
class SSLParams:
    """Extension (``ssl_params``): train the backbone label-free with SimCLR, for a
    side-information model. Labels are never used for training, only by the k-NN monitor."""

    method: Literal["simclr"] = "simclr"
    temperature: float = 0.2  # NT-Xent temperature
    projection_hidden_dim: int = 512  # projection head: Linear-BN-ReLU-Linear, discarded after training
    projection_dim: int = 128
    # two-view augmentation; None: fct.ssl.default_view_params for the data set's image size
    augmentation: Optional[ViewAugParams] = None
    knn_k: int = 20  # neighbours of the weighted k-NN monitor
    knn_every: int = 1  # run the k-NN monitor every this many epochs (and after the last one)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"ssl_params.temperature must be > 0, got {self.temperature}")
        for name in ("projection_hidden_dim", "projection_dim", "knn_k", "knn_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ssl_params.{name} must be >= 1, got {getattr(self, name)}")


def _check_path(key: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(f"{key} is an empty path")


def _check_lambda(key: str, value: float) -> None:
    if not (value >= 0.0 and value != float("inf")):  # also rejects NaN
        raise ConfigError(f"{key} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class BCTParams:
    """Extension (``bct_params``): backward-compatible training against ``old_model_path``
    (protocols.md §5), L = CE(W_new phi, y) + influence_weight * CE(W_old' phi, y)."""

    old_model_path: str
    influence_weight: float = 1.0  # lambda
    # a class the old model never saw: the direction of its mean old feature, scaled to the mean norm
    # of the old classifier's trained rows ("scaled"), or the raw mean ("mean", protocols.md §5 read
    # literally; several times longer than the trained rows, it can swamp the loss)
    synthesised_rows: Literal["scaled", "mean"] = "scaled"

    def __post_init__(self) -> None:
        _check_path("bct_params.old_model_path", self.old_model_path)
        _check_lambda("bct_params.influence_weight", self.influence_weight)


@dataclass(frozen=True)
class BackwardParams:
    """Extension (``backward_params``): train a linear map B_k (this version -> the previous one)
    jointly with the backbone, aligned through the frozen older maps with every older version."""

    previous_model_paths: list[str]  # [v_{k-1}, ..., v_0], newest first, frozen
    output_map_path: str  # where B_k is written (a 'transformation' model file)
    previous_map_paths: list[str] = field(default_factory=list)  # [B_{k-1}, ..., B_1], frozen
    weight: float = 1.0  # lambda

    def __post_init__(self) -> None:
        if not self.previous_model_paths:
            raise ConfigError("backward_params.previous_model_paths is empty; give the older models, newest first")
        n, m = len(self.previous_model_paths), len(self.previous_map_paths)
        if m != n - 1:
            raise ConfigError(
                f"backward_params: {n} previous_model_paths need {n - 1} previous_map_paths "
                f"(B_(k-1) .. B_1, newest first), got {m}"
            )
        for key in ("previous_model_paths", "previous_map_paths"):
            for i, p in enumerate(getattr(self, key)):
                _check_path(f"backward_params.{key}[{i}]", p)
        _check_path("backward_params.output_map_path", self.output_map_path)
        _check_lambda("backward_params.weight", self.weight)


@dataclass(frozen=True)
class BackboneConfig:
    """``train_backbone.py`` config."""

    arch_params: ArchParams
    optimizer_params: OptimizerParams
    dataset_params: DatasetParams
    epochs: int
    output_model_path: str
    lr_policy_params: LrPolicyParams = field(default_factory=LrPolicyParams)
    label_smoothing: float = 0.0
    seed: int = 0  # extension
    output_dir: Optional[str] = None  # extension: run folder; default runs/<model file stem>
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # extension
    ssl_params: Optional[SSLParams] = None  # extension: label-free (SimCLR) training; None: supervised
    init_from: Optional[str] = None  # extension: model file whose weights initialise a fresh run
    bct_params: Optional[BCTParams] = None  # extension: BCT influence loss against an old model
    backward_params: Optional[BackwardParams] = None  # extension: learned backward map, trained jointly

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        for key in ("bct_params", "backward_params"):
            if getattr(self, key) is not None and self.ssl_params is not None:
                raise ConfigError(f"{key} needs supervised training (it uses the labels); remove it or ssl_params")
        if self.backward_params is not None and self.backward_params.output_map_path == self.output_model_path:
            raise ConfigError("backward_params.output_map_path equals output_model_path; give the map its own file")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("init_from is an empty path; give a model file or leave it out")
        if self.ssl_params is not None and self.label_smoothing != 0.0:
            raise ConfigError(
                f"label_smoothing={self.label_smoothing} has no effect with ssl_params (label-free "
                "training has no classifier loss); remove it"
            )
        _check_twice("lr_policy_params", "epochs", self.lr_policy_params.epochs, self.epochs)
        _check_twice("lr_policy_params", "lr", self.lr_policy_params.lr, self.optimizer_params.lr)
        if self.lr_policy_params.warmup_length > self.epochs:
            raise ConfigError(
                f"lr_policy_params.warmup_length={self.lr_policy_params.warmup_length} exceeds epochs={self.epochs}"
            )
        n = self.dataset_params.num_classes
        # Label-free training never uses the classifier, so its width need not cover the classes.
        if self.ssl_params is None and n is not None and n > self.arch_params.num_classes:
            raise ConfigError(
                f"dataset_params.num_classes={n} exceeds arch_params.num_classes={self.arch_params.num_classes} "
                "(the classifier has too few outputs)"
            )

    @property
    def run_dir(self) -> str:
        if self.output_dir:
            return self.output_dir
        stem = os.path.splitext(os.path.basename(self.output_model_path))[0]
        return os.path.join("runs", stem)


@dataclass(frozen=True)
class EvalParams:
    _aliases: ClassVar[dict[str, str]] = {"distance_metric_name": "distance_metric"}

    distance_metric: Literal["l2", "cosine"] = "l2"
    verbose: bool = True
    compute_map: bool = True
    per_class: bool = False  # per-class CMC top-1/top-5 in the results
    topk: list[int] = field(default_factory=lambda: [1, 5])  # extension
    knn_backend: str = "torch"  # extension: torch (exact, chunked) | faiss
    chunk_size: Optional[int] = None  # extension: queries per chunk; None: from a memory budget
    # extension: 'auto' = leave-one-out when both sides are the same images (two models on the
    # evaluation split, or one features file on both sides)
    leave_one_out: Union[Literal["auto"], bool] = "auto"
    # backfilling (FastFill): B intermediate steps (B + 2 curve points), orderings, the reference's .npy
    backfilling: Optional[int] = None
    backfilling_list: list[str] = field(default_factory=lambda: ["random"])
    backfilling_result_path: Optional[str] = None
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

    gallery_model_path: Optional[str] = None
    query_model_path: Optional[str] = None
    query_features_path: Optional[str] = None  # extension
    gallery_features_path: Optional[str] = None  # extension
    eval_params: EvalParams = field(default_factory=EvalParams)
    dataset_params: Optional[DatasetParams] = None
    results_path: Optional[str] = None  # extension: JSON results
    seed: int = 0  # extension (random backfilling order)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # extension
    # extension: a reference case (e.g. old/old) to count negative/positive flips against
    # (fct/regression/flips.py); its flipped query indices go to flips_path (.npz, default
    # <results_path stem>_flips.npz)
    reference_query_model_path: Optional[str] = None
    reference_gallery_model_path: Optional[str] = None
    reference_query_features_path: Optional[str] = None
    reference_gallery_features_path: Optional[str] = None
    flips_path: Optional[str] = None

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


@dataclass(frozen=True)
class FeatureCacheParams:
    """Extension: train h on features computed once per augmented view of the training set.

    The old, new and side-information models are frozen, so their features for view v of the
    data (augmentation seeded by (seed, v, index)) never change: they are computed once, stored
    memory-mapped under ``dir`` and reused by every epoch and by later runs of the same models
    and data. Epoch e uses view e mod ``views``; with ``views >= epochs`` a cached run sees
    exactly the inputs of an on-the-fly run.
    """

    enabled: bool = True
    views: int = 10
    dir: str = "data_store/feature_cache"

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"feature_cache.views must be >= 1, got {self.views}")

