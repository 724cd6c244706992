"""``python -m fct.embed`` config: one model embeds one split of a data set into a features file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fct.config.common import DatasetParams, RuntimeParams
from fct.errors import ConfigError


@dataclass(frozen=True)
class EmbedConfig:
    """The model file, the images (``split`` of ``dataset_params``, narrowed by its ``num_classes``
    and ``train_fraction``) and the ``.npz`` features file to write: what ``eval.py`` (``*_features_path``),
    ``compat.py`` (``features_path``) and ``train_transformation.py`` (stored embeddings) read."""

    model_path: str  # fct model file or TorchScript file; a transformed old model with a FastFill head also writes log_variance
    dataset_params: DatasetParams  # the images; batch_size is the global batch of the forward passes
    output_path: str  # the .npz to write: features (N, D) float32, labels (N,), ids (N,) = row in the split, [log_variance]
    split: Literal["train", "val"] = "val"  # which split to embed (evaluation transforms, no augmentation)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # how the run executes

    def __post_init__(self) -> None:
        if not self.output_path.endswith(".npz"):
            raise ConfigError(f"output_path must end in .npz (a features file), got {self.output_path!r}")
