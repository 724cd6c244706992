"""``train_transformation.py`` config (reference schema, protocols.md §9, plus extensions).

``arch_params`` -> :class:`TransformationArchParams`; ``objective_params`` -> :class:`ObjectiveParams`.
Reference FCT configs have no ``objective_params``: its default is the FCT loss (MSE, weight 1).

The architecture names and which of them predict an uncertainty are known only to the registry of
transformations (fct.transformations.heads), which needs torch. This module does not import it at
load time (fct.transformations imports fct.config): :class:`TransformationArchParams` reaches it
when an instance is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from fct.config.common import DatasetParams, LrPolicyParams, OptimizerParams, RuntimeParams, check_repeated
from fct.errors import ConfigError


@dataclass(frozen=True)
class TransformationArchParams:
    """``arch_params`` of a transformation config; the keyword arguments of ``build_transformation``."""

    arch: str  # MLP_BN_SIDE_PROJECTION (FCT), MLP_BN_SIDE_PROJECTION_SIGMA (FastFill) or LINEAR
    old_embedding_dim: int  # width of the old model's embedding (h's input)
    new_embedding_dim: int  # width of the new model's embedding (h's output)
    side_info_dim: Optional[int] = None  # None: the side branch takes the old feature (no side-info model)
    inner_dim: int = 2048  # not used by LINEAR
    sigma_dim: int = 1  # FastFill only: 1 (per sample) or new_embedding_dim (per dimension)

    def __post_init__(self) -> None:
        from fct.transformations.heads import check_transformation_params

        check_transformation_params(self.arch, old_embedding_dim=self.old_embedding_dim,
                                    new_embedding_dim=self.new_embedding_dim, side_info_dim=self.side_info_dim,
                                    inner_dim=self.inner_dim, sigma_dim=self.sigma_dim)

    @property
    def has_uncertainty(self) -> bool:
        """Whether the architecture predicts an uncertainty (FastFill's log-variance)."""
        from fct.transformations.heads import TRANSFORMATIONS

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

    name: Literal["mse", "l1", "cosine"] = "mse"  # the distance
    mu_similarity: float = 1.0  # weight of this loss

    def __post_init__(self) -> None:
        _check_weight("similarity_loss.mu_similarity", self.mu_similarity)


@dataclass(frozen=True)
class DiscriminativeLossParams:
    """Cross-entropy of the new model's frozen classifier on h's output.

    ``LabelSmoothing`` uses ``label_smoothing`` (default 0.1); ``CE`` is plain cross-entropy and
    takes no ``label_smoothing`` (giving a non-zero one is an error rather than silently ignored).
    """

    name: Literal["LabelSmoothing", "CE"] = "LabelSmoothing"  # the cross-entropy variant
    label_smoothing: Optional[float] = None  # LabelSmoothing only, in [0, 1); None: 0.1
    mu_disc: float = 1.0  # weight of this loss

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

    mu_uncertainty: float = 0.5  # weight of the log-variance term s_i, > 0

    def __post_init__(self) -> None:
        if not self.mu_uncertainty > 0.0:
            # with 0 the loss is minimised by s -> +inf: training diverges
            raise ConfigError(
                f"objective_params.uncertainty_loss.mu_uncertainty must be > 0, got {self.mu_uncertainty}"
            )


@dataclass(frozen=True)
class ObjectiveParams:
    """``objective_params``: which losses train h and their weights."""

    similarity_loss: SimilarityLossParams = field(default_factory=SimilarityLossParams)  # h(old) vs new
    discriminative_loss: Optional[DiscriminativeLossParams] = None  # None: no classification loss
    # FastFill (an architecture that predicts an uncertainty needs it); None: FCT
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


@dataclass(frozen=True)
class FeatureCacheParams:
    """Extension: train h on features computed once per augmented view of the training set.

    The old, new and side-information models are frozen, so their features for view v of the
    data (augmentation seeded by (seed, v, index)) never change: they are computed once, stored
    memory-mapped under ``dir`` and reused by every epoch and by later runs of the same models
    and data. Epoch e uses view e mod ``views``; with ``views >= epochs`` a cached run sees
    exactly the inputs of an on-the-fly run.
    """

    enabled: bool = True  # false: run the frozen models on every batch of every epoch
    views: int = 10  # augmented views of the training set that are cached
    dir: str = "data_store/feature_cache"  # where the cached features are stored

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"feature_cache.views must be >= 1, got {self.views}")


# The roles of h's inputs and output: role -> (model key, training features key, validation features key).
ROLE_KEYS: dict[str, tuple[str, str, str]] = {
    "old": ("old_model_path", "old_features_path", "val_old_features_path"),
    "new": ("new_model_path", "new_features_path", "val_new_features_path"),
    "side": ("side_info_model_path", "side_info_features_path", "val_side_info_features_path"),
}


@dataclass(frozen=True, kw_only=True)
class TransformationConfig:
    """``train_transformation.py`` config: train h(old, side) -> new between frozen models, or on
    embeddings the models stored (``old_features_path``, ``new_features_path`` and their ``val_``
    counterparts; ``.npz`` with ``features`` (N, D), ``labels`` (N,) and optionally ``ids`` (N,)).

    With stored embeddings no model is run: ``new_model_path``, when given, only lends its classifier
    to the discriminative loss, and ``old_model_path`` (with ``side_info_model_path``) is only packed
    with h into the transformed old model; without ``old_model_path`` only h is written.
    """

    # the frozen old model; with old_features_path: not run, only packed into the transformed old model
    old_model_path: Optional[str] = None
    # the frozen new model (its classifier serves the discriminative loss); with new_features_path: not
    # run, only its classifier is used
    new_model_path: Optional[str] = None
    arch_params: TransformationArchParams  # the transformation h
    optimizer_params: OptimizerParams  # the optimiser of h
    # the training data (and its val split, for validation); with stored embeddings only batch_size and
    # num_workers are used
    dataset_params: DatasetParams
    epochs: int  # training epochs
    output_transformation_path: str  # h alone (a 'transformation' model file)
    # old model + side-information model + h as one gallery model for eval.py; needs old_model_path
    # (None only when training on stored embeddings without old_model_path: then only h is written)
    output_transformed_old_model_path: Optional[str] = None
    # frozen side-information model; None: none. With side_info_features_path: only packed into the
    # transformed old model
    side_info_model_path: Optional[str] = None
    # extension: the old model's embeddings of the training set (.npz); replaces running old_model_path
    old_features_path: Optional[str] = None
    new_features_path: Optional[str] = None  # extension: the new model's embeddings of the training set (.npz)
    # extension: the side-information model's embeddings of the training set (.npz); None: none
    side_info_features_path: Optional[str] = None
    val_old_features_path: Optional[str] = None  # extension: the old model's embeddings of the validation set
    val_new_features_path: Optional[str] = None  # extension: the new model's embeddings of the validation set
    # extension: the side-information model's embeddings of the validation set (with side_info_features_path)
    val_side_info_features_path: Optional[str] = None
    lr_policy_params: LrPolicyParams = field(default_factory=LrPolicyParams)  # learning-rate schedule
    objective_params: ObjectiveParams = field(default_factory=ObjectiveParams)  # the losses training h
    # from half of the epochs on, h's BatchNorm layers run in eval mode
    switch_mode_to_eval: bool = True
    seed: int = 0  # extension: seeds initialisation, data order and augmentation
    output_dir: Optional[str] = None  # extension: run folder; default runs/<transformation file stem>
    # extension (not used with stored embeddings, which are already in memory)
    feature_cache: FeatureCacheParams = field(default_factory=FeatureCacheParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)  # extension

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        check_repeated("lr_policy_params", "epochs", self.lr_policy_params.epochs, self.epochs)
        check_repeated("lr_policy_params", "lr", self.lr_policy_params.lr, self.optimizer_params.lr)
        check_objective_fits_arch(self.objective_params, self.arch_params)
        if self.lr_policy_params.warmup_length > self.epochs:
            raise ConfigError(
                f"lr_policy_params.warmup_length={self.lr_policy_params.warmup_length} exceeds epochs={self.epochs}"
            )
        if self.from_stored_embeddings:
            self._check_stored_embeddings()
        else:
            self._check_models()

    @property
    def from_stored_embeddings(self) -> bool:
        """Whether h trains on stored embeddings (any ``*_features_path`` given) rather than models."""
        return any(getattr(self, key) is not None for _, train, val in ROLE_KEYS.values() for key in (train, val))

    def _check_models(self) -> None:
        for role in ("old", "new"):
            model, train, val = ROLE_KEYS[role]
            if getattr(self, model) is None:
                raise ConfigError(f"missing {model} (or {train} and {val}, to train on stored embeddings)")
        if self.output_transformed_old_model_path is None:
            raise ConfigError("missing output_transformed_old_model_path (the transformed old model of old_model_path)")

    def _check_stored_embeddings(self) -> None:
        """Every role's embeddings come from files; a model file beside them has one named use only."""
        given = next(key for _, train, val in ROLE_KEYS.values() for key in (train, val) if getattr(self, key))
        for role in ("old", "new"):
            for key in ROLE_KEYS[role][1:]:
                if getattr(self, key) is None:
                    raise ConfigError(f"missing {key}: {given} is given, so h trains on stored embeddings and "
                                      f"every role's embeddings come from files ({ROLE_KEYS[role][0]} is not run)")
        side_model, side_train, side_val = ROLE_KEYS["side"]
        if (getattr(self, side_train) is None) != (getattr(self, side_val) is None):
            have, miss = (side_train, side_val) if getattr(self, side_train) else (side_val, side_train)
            raise ConfigError(f"{have} is given but {miss} is not; give both or neither")
        with_side = getattr(self, side_train) is not None
        if self.old_model_path is None:
            if self.output_transformed_old_model_path is not None:
                raise ConfigError("output_transformed_old_model_path needs old_model_path: from stored embeddings "
                                  "alone only h (output_transformation_path) is written")
            if self.side_info_model_path is not None:
                raise ConfigError(f"{side_model} with stored embeddings is only packed into the transformed old "
                                  f"model, which needs old_model_path; drop {side_model} or give old_model_path")
        else:
            if self.output_transformed_old_model_path is None:
                raise ConfigError("missing output_transformed_old_model_path (old_model_path is given, which is "
                                  "only used to write it)")
            if with_side and self.side_info_model_path is None:
                raise ConfigError(f"{side_train} is given, so the transformed old model needs {side_model} too")
        if self.side_info_model_path is not None and not with_side:
            raise ConfigError(f"{side_model} is given but {side_train} is not: with stored embeddings h's "
                              f"side input comes from {side_train} and {side_val}")
        if self.objective_params.discriminative_loss is not None and self.new_model_path is None:
            raise ConfigError("objective_params.discriminative_loss needs the new model's classifier: give "
                              "new_model_path (only its classifier is used; the embeddings come from "
                              "new_features_path) or drop discriminative_loss")

    @property
    def run_dir(self) -> str:
        if self.output_dir:
            return self.output_dir
        stem = os.path.splitext(os.path.basename(self.output_transformation_path))[0]
        return os.path.join("runs", stem)
