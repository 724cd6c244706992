"""What every backbone returns (its own module, so fct's ResNets and the foreign backbones
share it without importing each other)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class BackboneOutput(NamedTuple):
    embedding: torch.Tensor  # (N, embedding_dim), after global pooling
    logits: Optional[torch.Tensor]  # (N, num_classes), None for feature-only models
