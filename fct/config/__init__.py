"""Typed, strict YAML configs: frozen dataclasses, one per YAML section."""

from fct.config.loader import apply_overrides, from_dict, load_config, load_yaml, to_dict
from fct.config.schema import (
    ArchParams,
    BackboneConfig,
    DatasetParams,
    EvalConfig,
    EvalParams,
    LrPolicyParams,
    OptimizerParams,
    RuntimeParams,
)

__all__ = [
    "ArchParams",
    "BackboneConfig",
    "DatasetParams",
    "EvalConfig",
    "EvalParams",
    "LrPolicyParams",
    "OptimizerParams",
    "RuntimeParams",
    "apply_overrides",
    "from_dict",
    "load_config",
    "load_yaml",
    "to_dict",
]
