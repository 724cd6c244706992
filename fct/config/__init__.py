"""Typed, strict YAML configs: frozen dataclasses, one per YAML section, all defined in this package.

One config kind per entry script (docs/configuration.md lists every key, generated from these
classes by ``python -m fct.config.reference``):

- ``train_backbone.py``: :class:`BackboneConfig` (fct/config/backbone.py)
- ``train_transformation.py``: :class:`TransformationConfig` (fct/config/transformation.py)
- ``eval.py``: :class:`EvalConfig` (fct/config/evaluation.py)
- ``interpolate.py``: :class:`InterpolationConfig` (fct/config/interpolation.py)
- ``compat.py``: :class:`ChainConfig` (fct/config/chain.py)
- ``python -m fct.embed``: :class:`EmbedConfig` (fct/config/embed.py)
- a recipe's ``wrap`` step: :class:`WrapConfig` (fct/config/wrap.py)
- ``python -m fct.models.probe --config`` and a recipe's ``probe`` step: :class:`ProbeConfig` (fct/config/probe.py)

Sections several kinds share are in fct/config/common.py, the two-view augmentation section in
fct/config/augmentation.py; fct/config/loader.py turns YAML into these classes.
"""

from fct.config.augmentation import ViewAugParams
from fct.config.backbone import ArchParams, BackboneConfig, BackwardParams, BCTParams, SSLParams
from fct.config.chain import ChainConfig, ChainEdge, ChainVersion
from fct.config.common import DatasetParams, LrPolicyParams, OptimizerParams, RuntimeParams, check_repeated
from fct.config.evaluation import EvalConfig, EvalParams
from fct.config.interpolation import BatchNormParams, FisherParams, InterpolationConfig
from fct.config.loader import apply_overrides, from_dict, load_config, load_yaml, to_dict
from fct.config.transformation import (
    DiscriminativeLossParams,
    FeatureCacheParams,
    ObjectiveParams,
    SimilarityLossParams,
    TransformationArchParams,
    TransformationConfig,
    UncertaintyLossParams,
    check_objective_fits_arch,
)

__all__ = [
    "ArchParams",
    "BCTParams",
    "BackboneConfig",
    "BackwardParams",
    "BatchNormParams",
    "ChainConfig",
    "ChainEdge",
    "ChainVersion",
    "DatasetParams",
    "DiscriminativeLossParams",
    "EvalConfig",
    "EvalParams",
    "FeatureCacheParams",
    "FisherParams",
    "InterpolationConfig",
    "LrPolicyParams",
    "ObjectiveParams",
    "OptimizerParams",
    "RuntimeParams",
    "SSLParams",
    "SimilarityLossParams",
    "TransformationArchParams",
    "TransformationConfig",
    "UncertaintyLossParams",
    "ViewAugParams",
    "apply_overrides",
    "check_objective_fits_arch",
    "check_repeated",
    "from_dict",
    "load_config",
    "load_yaml",
    "to_dict",
]
