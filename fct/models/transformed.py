"""The transformed old model x -> h(phi_old(x), phi_side(x)): old-model features brought into the
new model's space, usable wherever an image model is (e.g. the gallery model of ``eval.py``).
Its model-file kind ``transformed_old`` is described in :mod:`fct.models.model_file`."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from fct.errors import UserError
from fct.models.backbones import BackboneOutput
from fct.transformations.heads import Transformation, TransformationOutput


def _embedding(out: Any, what: str) -> torch.Tensor:
    """(N, D) from a BackboneOutput-like result or a plain (N, D[, 1, 1]) tensor."""
    emb = getattr(out, "embedding", out)
    if not isinstance(emb, torch.Tensor):
        raise UserError(f"the {what} returned {type(out).__name__}, not an embedding tensor")
    return emb.flatten(1)


class TransformedOldModel(nn.Module):
    """x -> h(old(x), side(x)): old-model features brought into the new model's space.

    ``side_model=None``: h's side branch takes the old feature (no side-information model).
    The forward answers like a backbone (BackboneOutput, ``logits`` None), so feature extraction
    and evaluation take it as any gallery model.
    """

    def __init__(self, old_model: nn.Module, side_model: Optional[nn.Module], transformation: Transformation) -> None:
        super().__init__()
        self.old_model = old_model
        self.side_model = side_model
        self.transformation = transformation
        self.classifier = None  # it embeds only; no classifier of its own
        self.embedding_dim = transformation.new_embedding_dim

    def transform(self, x: torch.Tensor) -> TransformationOutput:
        """(N, 3, H, W) -> h's output: feature (N, new_dim), log_variance (N, sigma_dim) or None."""
        old = _embedding(self.old_model(x), "old model")
        side = None if self.side_model is None else _embedding(self.side_model(x), "side-information model")
        return self.transformation(old, side)

    def embed_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(N, 3, H, W) -> (feature (N, new_dim), log_variance (N, sigma_dim) or None)."""
        out = self.transform(x)
        return out.feature, out.log_variance

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(N, 3, H, W) -> BackboneOutput(embedding h(old, side) (N, new_dim), logits None)."""
        return BackboneOutput(embedding=self.transform(x).feature, logits=None)
