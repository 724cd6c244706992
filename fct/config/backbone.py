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

    # registered backbone (fct.models), e.g. ResNet18, ResNet50, CifarResNet18; or timm/<name> (timm's
    # registry) or torchvision/<name> (a torchvision.models classifier), built with random weights
    arch: str
    num_classes: int  # width of the classifier layer (may exceed the classes trained on)
    # embedding width; None: the architecture's natural width (timm/torchvision: a bias-free linear
    # projection is added when it differs from the network's feature width)
    embedding_dim: Optional[int] = None
    # ReLU on the embedding (reference behaviour); timm/torchvision: only after the projection, the
    # network's own features are kept as they are
    last_nonlin: bool = True
    # timm/torchvision: local weights (.safetensors, or .pt/.pth read with weights_only) loaded into the
    # network before training; the network's own classifier keys are dropped, any other mismatch fails
    pretrained_path: Optional[str] = None
    # timm/torchvision: prefix renames of the weight file's keys, e.g. {"module.": ""}; first match wins.
    # {"@positional": ""} (alone) instead pairs the file's tensors with the network's in order, each
    # pair of equal shape (fails on the first mismatch, naming both), for a file of the same layers
    # under other names (e.g. flat _blocks.N against timm's blocks.S.I); a trailing classifier is dropped
    key_map: Optional[dict] = None
    # timm/torchvision: module (dotted name) whose globally pooled output is the embedding; None: the
    # input of the network's classifier (timm's pooled pre-logits, torchvision's input of its last Linear)
    embedding_layer: Optional[str] = None
    # timm/torchvision: extra keyword arguments of the builder (plain values), e.g. {"drop_path_rate": 0.1}
    arch_kwargs: Optional[dict] = None
    # timm/torchvision: the input normalisation the weights expect, recorded as the model's
    # `preprocessing`; None: timm's pretrained data config, ImageNet's mean/std for torchvision
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None  # as image_mean
    image_size: Optional[int] = None  # as image_mean: the input side the weights were trained at

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"arch_params.num_classes must be >= 1, got {self.num_classes}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ConfigError(f"arch_params.embedding_dim must be >= 1, got {self.embedding_dim}")
        foreign = "/" in self.arch
        for key in ("pretrained_path", "key_map", "embedding_layer", "arch_kwargs", "image_mean", "image_std",
                    "image_size"):
            if getattr(self, key) is not None and not foreign:
                raise ConfigError(f"arch_params.{key} is for timm/<name> and torchvision/<name> backbones, "
                                  f"not {self.arch}")
        if self.pretrained_path is not None:
            _check_path("arch_params.pretrained_path", self.pretrained_path)
        if self.key_map is not None and not all(isinstance(k, str) and isinstance(v, str) and k
                                                for k, v in self.key_map.items()):
            raise ConfigError(f"arch_params.key_map must map non-empty key prefixes to prefixes (strings), "
                              f"got {self.key_map!r}")
        if self.key_map is not None and self.pretrained_path is None:
            raise ConfigError("arch_params.key_map renames the keys of pretrained_path, which is not given")
        kwargs = self.arch_kwargs
        if kwargs is not None and not all(isinstance(k, str) and _plain(v) for k, v in kwargs.items()):
            raise ConfigError(f"arch_params.arch_kwargs must map names to plain values (numbers, strings, "
                              f"booleans, lists), got {self.arch_kwargs!r}")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or (key == "image_std" and min(value) <= 0)):
                raise ConfigError(f"arch_params.{key} must be 3 numbers{' > 0' if key == 'image_std' else ''}, "
                                  f"got {list(value)}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"arch_params.image_size must be >= 1, got {self.image_size}")


def _plain(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


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
