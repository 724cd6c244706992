"""The ``wrap`` step of a recipe: a pretrained timm / torchvision model written as an fct model file
(what ``python -m fct.models.wrap --config C --out F`` does with a config's ``arch_params``)."""

from __future__ import annotations

from dataclasses import dataclass

from fct.config.backbone import ArchParams
from fct.errors import ConfigError


@dataclass(frozen=True)
class WrapConfig:
    """``arch_params`` of a ``timm/<name>`` or ``torchvision/<name>`` backbone (with its
    ``pretrained_path``) and the model file to write."""

    arch_params: ArchParams  # the backbone and its weights, as in a train_backbone.py config
    output_model_path: str  # the fct model file to write (rewritten on every run: wrapping is deterministic)

    def __post_init__(self) -> None:
        if "/" not in self.arch_params.arch:
            raise ConfigError(f"arch_params.arch: wrap is for timm/<name> and torchvision/<name>, "
                              f"not {self.arch_params.arch}")
