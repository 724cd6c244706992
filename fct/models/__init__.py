"""Backbones and self-describing model files."""

from fct.models.backbones import (
    BACKBONES,
    BackboneOutput,
    ResNet,
    backbone_arch_params,
    build_backbone,
)
from fct.models.model_file import (
    MODEL_KINDS,
    ScriptedEmbeddingModel,
    is_torchscript_file,
    load_model_file,
    model_num_params,
    probe_model,
    read_model_file,
    save_model_file,
    strip_wrapper_prefixes,
    unwrap_model,
)
import fct.transformations.transformed_model  # noqa: F401,E402  registers model kinds 'transformation', 'transformed_old'

__all__ = [
    "BACKBONES",
    "BackboneOutput",
    "MODEL_KINDS",
    "ResNet",
    "ScriptedEmbeddingModel",
    "backbone_arch_params",
    "build_backbone",
    "is_torchscript_file",
    "load_model_file",
    "model_num_params",
    "probe_model",
    "read_model_file",
    "save_model_file",
    "strip_wrapper_prefixes",
    "unwrap_model",
]
