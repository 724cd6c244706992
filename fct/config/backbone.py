"""``train_backbone.py`` config (reference schema, protocols.md §9, plus extensions)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from fct.config.augmentation import ViewAugParams
from fct.config.common import DatasetParams, LrPolicyParams, OptimizerParams, RuntimeParams, check_repeated
from fct.errors import ConfigError


@dataclass(frozen=True)
class ArchParams:
    """Backbone architecture (``arch_params`` of a backbone config)."""

    arch: str  # registered backbone (fct.models), e.g. ResNet18, ResNet50, CifarResNet18
    num_classes: int  # width of the classifier layer (may exceed the classes trained on)
    embedding_dim: Optional[int] = None  # embedding width; None: the architecture's natural width
    last_nonlin: bool = True  # ReLU on the embedding (reference behaviour)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"arch_params.num_classes must be >= 1, got {self.num_classes}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ConfigError(f"arch_params.embedding_dim must be >= 1, got {self.embedding_dim}")


@dataclass(frozen=True)
class SSLParams:
    """Extension (``ssl_params``): train the backbone label-free with SimCLR, for a
    side-information model. Labels are never used for training, only by the k-NN monitor."""

    method: Literal["simclr"] = "simclr"  # the label-free objective
    temperature: float = 0.2  # NT-Xent temperature
    projection_hidden_dim: int = 512  # projection head: Linear-BN-ReLU-Linear, discarded after training
    projection_dim: int = 128  # output width of the projection head (where the loss is computed)
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

    old_model_path: str  # the frozen old model whose classifier the new embedding must fit
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

    arch_params: ArchParams  # the backbone architecture
    optimizer_params: OptimizerParams  # the optimiser
    dataset_params: DatasetParams  # the training data (and its val split, for validation)
    epochs: int  # training epochs
    output_model_path: str  # the trained model file (eval.py, train_transformation.py read it)
    lr_policy_params: LrPolicyParams = field(default_factory=LrPolicyParams)  # learning-rate schedule
    label_smoothing: float = 0.0  # of the classification cross-entropy, in [0, 1)
    seed: int = 0  # extension: seeds initialisation, data order and augmentation
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
        check_repeated("lr_policy_params", "epochs", self.lr_policy_params.epochs, self.epochs)
        check_repeated("lr_policy_params", "lr", self.lr_policy_params.lr, self.optimizer_params.lr)
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
