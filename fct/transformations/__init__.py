"""FCT/FastFill transformations h(old, side) -> new (heads.py) and their losses (losses.py).

The package exports the heads only: ``fct.config`` checks transformation arch params against
their registry, and the losses take ``fct.config`` types, so importing the losses here would tie
the two packages in a circle. Import the losses from ``fct.transformations.losses``; the model
files of h and of the transformed old model live in ``fct.models``.
"""

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

__all__ = [
    "BatchNorm1dAnyBatch",
    "LinearTransformation",
    "MLPSideProjection",
    "MLPSideProjectionSigma",
    "TRANSFORMATIONS",
    "Transformation",
    "TransformationOutput",
    "build_transformation",
    "check_transformation_params",
    "uncertainty_score",
]
