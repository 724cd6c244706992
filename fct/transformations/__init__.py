"""FCT/FastFill transformations h(old, side) -> new, their losses and the transformed old model."""

from fct.transformations.heads import (
    TRANSFORMATIONS,
    BatchNorm1dAnyBatch,
    LinearTransformation,
    MLPSideProjection,
    MLPSideProjectionSigma,
    Transformation,
    TransformationOutput,
    build_transformation,
    check_transformation_params,
    uncertainty_score,
)
from fct.transformations.losses import (
    DISCRIMINATIVE_LOSSES,
    SIMILARITY_LOSSES,
    discriminative_per_sample,
    frozen_logits,
    similarity_loss,
    similarity_per_sample,
    transformation_loss,
    uncertainty_loss,
)
from fct.transformations.transformed_model import (
    TorchScriptPart,
    TransformedOldModel,
    save_transformation,
    save_transformed_old_model,
)

__all__ = [
    "BatchNorm1dAnyBatch",
    "DISCRIMINATIVE_LOSSES",
    "LinearTransformation",
    "MLPSideProjection",
    "MLPSideProjectionSigma",
    "SIMILARITY_LOSSES",
    "TRANSFORMATIONS",
    "TorchScriptPart",
    "Transformation",
    "TransformationOutput",
    "TransformedOldModel",
    "build_transformation",
    "check_transformation_params",
    "discriminative_per_sample",
    "frozen_logits",
    "save_transformation",
    "save_transformed_old_model",
    "similarity_loss",
    "similarity_per_sample",
    "transformation_loss",
    "uncertainty_loss",
    "uncertainty_score",
]
