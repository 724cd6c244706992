"""Config sections of a transformation run (reference schema, protocols.md §9).

``arch_params`` -> :class:`TransformationArchParams`; ``objective_params`` ->
:class:`ObjectiveParams`. Reference FCT configs have no ``objective_params``: its default is the
FCT loss (MSE, weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from fct.errors import ConfigError
from fct.transformations.heads import TRANSFORMATIONS, check_transformation_params


@dataclass(frozen=True)
class TransformationArchParams:
    """``arch_params`` of a transformation config; the keyword arguments of ``build_transformation``."""

    arch: str
    old_embedding_dim: int
    new_embedding_dim: int
    side_info_dim: Optional[int] = None  # None: the side branch takes the old feature (no side-info model)
    inner_dim: int = 2048  # not used by LINEAR
    sigma_dim: int = 1  # FastFill only: 1 (per sample) or new_embedding_dim (per dimension)

    def __post_init__(self) -> None:
        check_transformation_params(self.arch, old_embedding_dim=self.old_embedding_dim,
                                    new_embedding_dim=self.new_embedding_dim, side_info_dim=self.side_info_dim,
                                    inner_dim=self.inner_dim, sigma_dim=self.sigma_dim)

    @property
    def has_uncertainty(self) -> bool:
        return bool(getattr(TRANSFORMATIONS.get(self.arch), "has_uncertainty", False))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``build_transformation(**d)`` and model files."""
        return {"arch": self.arch, "old_embedding_dim": self.old_embedding_dim,
                "new_embedding_dim": self.new_embedding_dim, "side_info_dim": self.side_info_dim,
                "inner_dim": self.inner_dim, "sigma_dim": self.sigma_dim}


def _check_weight(key: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ConfigError(f"objective_params.{key} must be >= 0, got {value}")


@dataclass(frozen=True)
class SimilarityLossParams:
    """Distance between h(old, side) and the new feature: mean over dimensions of (h - new)^2
    (``mse``) or |h - new| (``l1``), or 1 - cos(h, new) (``cosine``)."""

    name: Literal["mse", "l1", "cosine"] = "mse"
    mu_similarity: float = 1.0

    def __post_init__(self) -> None:
        _check_weight("similarity_loss.mu_similarity", self.mu_similarity)


@dataclass(frozen=True)
class DiscriminativeLossParams:
    """Cross-entropy of the new model's frozen classifier on h's output.

    ``LabelSmoothing`` uses ``label_smoothing`` (default 0.1); ``CE`` is plain cross-entropy and
    takes no ``label_smoothing`` (giving a non-zero one is an error rather than silently ignored).
    """

    name: Literal["LabelSmoothing", "CE"] = "LabelSmoothing"
    label_smoothing: Optional[float] = None
    mu_disc: float = 1.0

    def __post_init__(self) -> None:
        _check_weight("discriminative_loss.mu_disc", self.mu_disc)
        ls = self.label_smoothing
        if ls is not None and not 0.0 <= ls < 1.0:
            raise ConfigError(f"objective_params.discriminative_loss.label_smoothing must be in [0, 1), got {ls}")
        if self.name == "CE" and ls not in (None, 0.0):
            raise ConfigError(
                f"objective_params.discriminative_loss.label_smoothing={ls} with name CE (plain "
                "cross-entropy); use name LabelSmoothing"
            )

    @property
    def smoothing(self) -> float:
        """The label smoothing actually applied."""
        if self.name == "CE":
            return 0.0
        return 0.1 if self.label_smoothing is None else self.label_smoothing


@dataclass(frozen=True)
class UncertaintyLossParams:
    """FastFill: total = mean_i [0.5 * exp(-s_i) * L_i + mu_uncertainty * s_i]."""

    mu_uncertainty: float = 0.5

    def __post_init__(self) -> None:
        if not self.mu_uncertainty > 0.0:
            # with 0 the loss is minimised by s -> +inf: training diverges
            raise ConfigError(
                f"objective_params.uncertainty_loss.mu_uncertainty must be > 0, got {self.mu_uncertainty}"
            )


@dataclass(frozen=True)
class ObjectiveParams:
    """``objective_params``: which losses train h and their weights."""

    similarity_loss: SimilarityLossParams = field(default_factory=SimilarityLossParams)
    discriminative_loss: Optional[DiscriminativeLossParams] = None
    uncertainty_loss: Optional[UncertaintyLossParams] = None

    def __post_init__(self) -> None:
        disc = self.discriminative_loss
        if self.similarity_loss.mu_similarity == 0.0 and (disc is None or disc.mu_disc == 0.0):
            raise ConfigError("objective_params: every loss weight is 0; nothing would train the transformation")


def check_objective_fits_arch(objective: ObjectiveParams, arch: TransformationArchParams) -> None:
    """Raise ConfigError when the objective and the architecture do not go together: the
    uncertainty loss needs a head that predicts an uncertainty, and such a head needs the
    uncertainty loss (nothing else trains its log-variance)."""
    if objective.uncertainty_loss is not None and not arch.has_uncertainty:
        raise ConfigError(
            f"objective_params.uncertainty_loss needs a transformation that predicts an uncertainty, but "
            f"arch_params.arch={arch.arch} does not; use MLP_BN_SIDE_PROJECTION_SIGMA or drop uncertainty_loss"
        )
    if objective.uncertainty_loss is None and arch.has_uncertainty:
        raise ConfigError(
            f"arch_params.arch={arch.arch} predicts an uncertainty, which only objective_params.uncertainty_loss "
            "trains; add 'uncertainty_loss: {mu_uncertainty: 0.5}' or use MLP_BN_SIDE_PROJECTION"
        )
