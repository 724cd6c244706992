"""Backbones, TorchScript models of the reference, the transformed old model, and the
self-describing model files of every kind."""

from fct.models.backbones import (
    BACKBONES,
    BackboneOutput,
    ResNet,
    backbone_arch_params,
    build_backbone,
)
from fct.models.foreign import expect_inputs
from fct.models.model_file import (
    MODEL_KINDS,
    load_model_file,
    model_num_params,
    probe_model,
    read_model_file,
    save_model_file,
    strip_wrapper_prefixes,
    unwrap_model,
)
from fct.models.scripted import ScriptedEmbeddingModel, TorchScriptPart, is_torchscript_file
from fct.models.transformation_files import save_transformation, save_transformed_old_model
from fct.models.transformed import TransformedOldModel

__all__ = [
    "BACKBONES",
    "BackboneOutput",
    "MODEL_KINDS",
    "ResNet",
    "ScriptedEmbeddingModel",
    "TorchScriptPart",
    "TransformedOldModel",
    "backbone_arch_params",
    "build_backbone",
    "expect_inputs",
    "is_torchscript_file",
    "load_model_file",
    "model_num_params",
    "probe_model",
    "read_model_file",
    "save_model_file",
    "save_transformation",
    "save_transformed_old_model",
    "strip_wrapper_prefixes",
    "unwrap_model",
]
