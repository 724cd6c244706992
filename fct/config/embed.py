"""``python -m fct.embed`` config: one model embeds one split of a data set into a features file."""

from __future__ import annotations

import os
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
    # a .npz features file: features (N, D) float32, labels (N,), ids (N,), [log_variance]; or a folder
    # (no .npz suffix): the same arrays in resumable shards of shard_size rows
    output_path: str
    split: Literal["train", "val"] = "val"  # which split to embed (evaluation transforms, no augmentation)
    shard_size: int = 100_000  # rows per shard of a folder output (the unit of resumption and of work per process)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # how the run executes

    def __post_init__(self) -> None:
        suffix = os.path.splitext(self.output_path.rstrip("/"))[1]
        if suffix not in ("", ".npz"):
            raise ConfigError(f"output_path must be a .npz features file or a folder (no suffix) for shards, "
                              f"got {self.output_path!r}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
