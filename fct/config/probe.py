"""The ``probe`` step of a recipe: a backbone model file's classifier fitted on stored embeddings
(what ``python -m fct.models.probe --config C`` does)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from fct.errors import ConfigError


@dataclass(frozen=True)
class ProbeConfig:
    """A linear probe: the classifier of ``model_path`` fitted on ``features_path`` (the model's stored
    embeddings and labels of the training set), written with the rest of the model unchanged."""

    model_path: str  # backbone model file whose bias-free classifier is fitted (its trunk is not run)
    features_path: str  # the model's stored embeddings of the training set (features, labels; .npz or a folder)
    output_model_path: str  # the model file to write: the input with the fitted classifier
    val_features_path: Optional[str] = None  # stored embeddings whose top-1 classification accuracy is reported
    label_smoothing: float = 0.1  # of the cross-entropy, as the discriminative loss uses it
    weight_decay: float = 0.0001  # L2 penalty weight_decay * ||W||^2 / 2
    steps: int = 100  # L-BFGS iterations (full batch, from zero weights)

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing {self.label_smoothing}: give a value in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ConfigError(f"weight_decay {self.weight_decay}: give a value >= 0")
        if self.steps < 1:
            raise ConfigError(f"steps {self.steps}: give at least 1")
