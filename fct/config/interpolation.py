"""``interpolate.py`` config: a BCWI sweep (protocols.md §7) of an old model and new model(s)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from fct.config.common import DatasetParams, RuntimeParams
from fct.errors import ConfigError

METHODS = ("plain", "fisher", "soup")


@dataclass(frozen=True)
class FisherParams:
    """The old model's diagonal Fisher information (fct.regression.interpolation.diagonal_fisher),
    on its training data (the classes it was trained on, no augmentation), per-sample gradients."""

    labels: Literal["true", "predicted"] = "true"  # true: the empirical Fisher; predicted: argmax
    max_samples: Optional[int] = 2000  # a seeded random subset of this many images; None: all
    normalize: Literal["mean", "max", "none"] = "mean"  # divide F by its mean (or max) over all weights

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"fisher.max_samples must be >= 1 or null, got {self.max_samples}")


@dataclass(frozen=True)
class BatchNormParams:
    """Re-estimate BatchNorm running statistics of every interpolated model on training data
    (the new model's classes, seeded shuffle and seeded augmentation)."""

    recompute: bool = True  # false: keep the running statistics interpolated with the weights
    num_batches: int = 50  # batches of dataset_params.batch_size (fewer if the data runs out)
    # the training transforms (random crop, flip): the statistics the weights were trained with.
    # false: the evaluation transforms, which shift the statistics (at alpha 1 the old model then
    # scores below itself as trained: docs/studies/regression.md)
    augment: bool = True

    def __post_init__(self) -> None:
        if self.num_batches < 1:
            raise ConfigError(f"batchnorm.num_batches must be >= 1, got {self.num_batches}")


@dataclass(frozen=True)
class InterpolationConfig:
    """theta(alpha) = alpha * theta_old + (1 - alpha) * theta_new for each method and alpha.

    plain and fisher use ``new_model_paths[0]``; soup uses the mean of all of them (two or more).
    Accuracy and flips are measured on the evaluation split of ``dataset_params`` (its
    ``num_classes`` keeps labels below it; None: all classes); the training split feeds the Fisher
    (the old model's classes) and the BatchNorm statistics (the new model's classes).
    """

    old_model_path: str  # the old model (alpha = 1)
    new_model_paths: list[str]  # the new model(s) (alpha = 0); soup averages all of them
    # its evaluation split for accuracy and flips, its training split for the Fisher and BatchNorm
    dataset_params: DatasetParams
    output_dir: str  # run folder: results.json (resumable), table, plot, fisher.pt
    methods: list[str] = field(default_factory=lambda: ["plain", "fisher"])  # any of plain, fisher, soup
    # the old model's weights alpha, in [0, 1]
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    # classes each model was trained on (labels 0..K-1); None: the model file's meta
    # 'trained_classes', else its classifier width
    old_num_classes: Optional[int] = None
    new_num_classes: Optional[int] = None  # as old_num_classes, for the new model(s)
    fisher: FisherParams = field(default_factory=FisherParams)  # the Fisher weights of method fisher
    batchnorm: BatchNormParams = field(default_factory=BatchNormParams)  # BatchNorm statistics per model
    distance_metric: Literal["l2", "cosine"] = "l2"  # retrieval on the evaluation split, leave-one-out
    save_models: bool = False  # also write output_dir/models/<method>_alpha<a>.pt for eval.py
    seed: int = 0  # seeds the Fisher subset and the BatchNorm batches (order and augmentation)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # how the run executes

    def __post_init__(self) -> None:
        if self.dataset_params.name == "webdataset":
            raise ConfigError("dataset_params.name=webdataset: interpolate.py measures accuracy and flips per "
                              "image of the evaluation split, which needs a map-style data set (npz, cifar100, "
                              "imagefolder, ...); write one with prepare_dataset.py")
        if not self.new_model_paths:
            raise ConfigError("new_model_paths must list at least one model file")
        if not self.methods:
            raise ConfigError(f"methods must be a non-empty list of {', '.join(METHODS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"unknown interpolation method {m!r}; valid: {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods lists a method twice: {list(self.methods)}")
        if "soup" in self.methods and len(self.new_model_paths) < 2:
            raise ConfigError("method 'soup' averages several new models: give two or more new_model_paths")
        if not self.alphas:
            raise ConfigError("alphas must be a non-empty list of numbers in [0, 1]")
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"alphas must lie in [0, 1] (the old model's weight), got {a}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ConfigError(f"alphas lists a value twice: {list(self.alphas)}")
        for name in ("old_num_classes", "new_num_classes"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty; give the run folder")

    @property
    def run_dir(self) -> str:
        return os.path.normpath(self.output_dir)
