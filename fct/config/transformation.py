"""``train_transformation.py`` config (reference schema, protocols.md §9, plus extensions)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from fct.config.schema import (
    DatasetParams,
    FeatureCacheParams,
    LrPolicyParams,
    OptimizerParams,
    RuntimeParams,
    _check_twice,
)
from fct.errors import ConfigError
from fct.transformations.config import ObjectiveParams, TransformationArchParams, check_objective_fits_arch


@dataclass(frozen=True)
class TransformationConfig:
    old_model_path: str
    new_model_path: str
    arch_params: TransformationArchParams
    optimizer_params: OptimizerParams
    dataset_params: DatasetParams
    epochs: int
    output_transformation_path: str
    output_transformed_old_model_path: str
    side_info_model_path: Optional[str] = None
    lr_policy_params: LrPolicyParams = field(default_factory=LrPolicyParams)
    objective_params: ObjectiveParams = field(default_factory=ObjectiveParams)
    # from half of the epochs on, h's BatchNorm layers run in eval mode
    switch_mode_to_eval: bool = True
    seed: int = 0  # extension
    output_dir: Optional[str] = None  # extension: run folder; default runs/<transformation file stem>
    feature_cache: FeatureCacheParams = field(default_factory=FeatureCacheParams)  # extension
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # extension

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        _check_twice("lr_policy_params", "epochs", self.lr_policy_params.epochs, self.epochs)
        _check_twice("lr_policy_params", "lr", self.lr_policy_params.lr, self.optimizer_params.lr)
        check_objective_fits_arch(self.objective_params, self.arch_params)
        if self.lr_policy_params.warmup_length > self.epochs:
            raise ConfigError(
                f"lr_policy_params.warmup_length={self.lr_policy_params.warmup_length} exceeds epochs={self.epochs}"
            )

    @property
    def run_dir(self) -> str:
        if self.output_dir:
            return self.output_dir
        stem = os.path.splitext(os.path.basename(self.output_transformation_path))[0]
        return os.path.join("runs", stem)
