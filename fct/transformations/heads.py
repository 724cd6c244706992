"""Transformations h(old feature, side-information feature) -> new feature (protocols.md §3).

Architectures (registry :data:`TRANSFORMATIONS`, names from the reference schema):

``MLP_BN_SIDE_PROJECTION`` (FCT)
    old branch  old_dim  -> 2*old_dim  -> 2*new_dim
    side branch side_dim -> 2*side_dim -> 2*new_dim
    mixer       concat 4*new_dim -> inner_dim -> inner_dim -> new_dim
    Every layer but the last is Linear (no bias) + BatchNorm + ReLU; the last is a plain Linear
    with bias. At old=new=side=128, inner 2048 this is 5,712,000 parameters, as the reference
    (its 1x1 convolutions on (N, D, 1, 1) tensors are these linear layers).
``MLP_BN_SIDE_PROJECTION_SIGMA`` (FastFill)
    the same network plus a linear head on the last hidden layer that predicts the log-variance
    s = log sigma^2, ``sigma_dim`` values per sample (1, or one per new dimension). It is returned
    as its own output, never as extra channels of the feature.
``LINEAR``
    one affine map of [old, side] -> new, the cheap baseline.

Without a side-information model the side branch takes the old feature again (as the reference
does): call ``h(old, None)``; the side branch width must then equal the old width.

BatchNorm and a batch of one: PyTorch's BatchNorm cannot compute batch statistics of a single
sample in train mode. Here a train-mode batch of one is normalised with the running statistics,
which it leaves untouched (exactly what eval mode does); larger batches behave as usual.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fct.errors import ConfigError, UserError
from fct.registry import Registry


class TransformationOutput(NamedTuple):
    feature: torch.Tensor  # (N, new_dim): h(old, side)
    log_variance: Optional[torch.Tensor]  # (N, sigma_dim) FastFill uncertainty s = log sigma^2; None for FCT heads


class BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """BatchNorm1d that accepts a batch of one in train mode.

    With N == 1 in train mode it normalises with the running statistics and does not update
    them (eval-mode behaviour); with N > 1 it is plain BatchNorm1d. Its state dict is that of
    BatchNorm1d, so ``convert_sync_batchnorm`` and reference-shaped checkpoints treat it as one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C)."""
        if self.training and x.shape[0] == 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


def _block(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias: BatchNorm's shift replaces it) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), BatchNorm1dAnyBatch(out_dim), nn.ReLU(inplace=True))


def _as_features(x: torch.Tensor, expected: int, what: str) -> torch.Tensor:
    """(N, D) or (N, D, 1, 1) -> (N, D), checking D; raises UserError on any other shape."""
    if x.dim() > 2 and all(s == 1 for s in x.shape[2:]):
        x = x.flatten(1)  # reference TorchScript models return pooled (N, D, 1, 1) features
    if x.dim() != 2:
        raise UserError(
            f"the transformation takes {what} features of shape (N, {expected}), got {tuple(x.shape)}; "
            "a transformation file maps features, not images (evaluate the 'transformed_old' model file)"
        )
    if x.shape[1] != expected:
        raise UserError(f"the transformation expects {what} features of width {expected}, got {x.shape[1]}")
    return x


class Transformation(nn.Module):
    """Base of the heads: input checks and the arch params that rebuild the module.

    ``sigma_dim`` is the number of log-variance outputs per sample (0 for heads without
    uncertainty); ``has_uncertainty`` says whether ``log_variance`` is produced.
    """

    arch: ClassVar[str] = ""
    has_uncertainty: ClassVar[bool] = False

    def __init__(self, old_embedding_dim: int, new_embedding_dim: int, side_info_dim: Optional[int],
                 inner_dim: int, sigma_dim: int) -> None:
        super().__init__()
        # as given, so that arch_params() rebuilds exactly this module (side_info_dim may be None)
        self._given = {"old_embedding_dim": old_embedding_dim, "new_embedding_dim": new_embedding_dim,
                       "side_info_dim": side_info_dim, "inner_dim": inner_dim, "sigma_dim": sigma_dim}
        self.old_embedding_dim = old_embedding_dim
        self.new_embedding_dim = new_embedding_dim
        self.side_info_dim = old_embedding_dim if side_info_dim is None else side_info_dim  # side-branch width
        self.inner_dim = inner_dim
        self.sigma_dim = sigma_dim if self.has_uncertainty else 0

    def arch_params(self) -> dict[str, Any]:
        """The keyword arguments of :func:`build_transformation` that rebuild this module."""
        return {"arch": self.arch, **self._given}

    def _inputs(self, old: torch.Tensor, side: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked (N, old_dim) and (N, side_dim) inputs; ``side=None`` reuses the old feature."""
        old = _as_features(old, self.old_embedding_dim, "old")
        if side is None:
            if self.side_info_dim != self.old_embedding_dim:
                raise UserError(
                    f"no side-information feature given, so the side branch takes the old feature, but "
                    f"side_info_dim={self.side_info_dim} differs from old_embedding_dim={self.old_embedding_dim}"
                )
            return old, old
        side = _as_features(side, self.side_info_dim, "side-information")
        if side.shape[0] != old.shape[0]:
            raise UserError(f"old features hold {old.shape[0]} samples but side-information features {side.shape[0]}")
        return old, side

    def forward(self, old: torch.Tensor, side: Optional[torch.Tensor] = None) -> TransformationOutput:
        raise NotImplementedError


class MLPSideProjection(Transformation):
    """FCT transformation: two branches, concatenation, BatchNorm MLP (see the module docstring)."""

    arch = "MLP_BN_SIDE_PROJECTION"

    def __init__(self, old_embedding_dim: int, new_embedding_dim: int, side_info_dim: Optional[int] = None,
                 inner_dim: int = 2048, sigma_dim: int = 1) -> None:
        super().__init__(old_embedding_dim, new_embedding_dim, side_info_dim, inner_dim, sigma_dim)
        o, n, s = old_embedding_dim, new_embedding_dim, self.side_info_dim
        self.old_branch = nn.Sequential(_block(o, 2 * o), _block(2 * o, 2 * n))
        self.side_branch = nn.Sequential(_block(s, 2 * s), _block(2 * s, 2 * n))
        self.mixer = nn.Sequential(_block(4 * n, inner_dim), _block(inner_dim, inner_dim))
        self.out = nn.Linear(inner_dim, n)

    def hidden(self, old: torch.Tensor, side: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, old_dim), (N, side_dim) or None -> last hidden layer (N, inner_dim)."""
        old, side = self._inputs(old, side)
        return self.mixer(torch.cat([self.old_branch(old), self.side_branch(side)], dim=1))

    def forward(self, old: torch.Tensor, side: Optional[torch.Tensor] = None) -> TransformationOutput:
        """(N, old_dim), (N, side_dim) or None -> TransformationOutput(feature (N, new_dim), None)."""
        return TransformationOutput(self.out(self.hidden(old, side)), None)


class MLPSideProjectionSigma(MLPSideProjection):
    """FastFill transformation: the FCT network plus a log-variance head on its last hidden layer."""

    arch = "MLP_BN_SIDE_PROJECTION_SIGMA"
    has_uncertainty = True

    def __init__(self, old_embedding_dim: int, new_embedding_dim: int, side_info_dim: Optional[int] = None,
                 inner_dim: int = 2048, sigma_dim: int = 1) -> None:
        super().__init__(old_embedding_dim, new_embedding_dim, side_info_dim, inner_dim, sigma_dim)
        self.log_variance = nn.Linear(inner_dim, sigma_dim)

    def forward(self, old: torch.Tensor, side: Optional[torch.Tensor] = None) -> TransformationOutput:
        """-> TransformationOutput(feature (N, new_dim), log_variance (N, sigma_dim))."""
        hidden = self.hidden(old, side)
        return TransformationOutput(self.out(hidden), self.log_variance(hidden))


class LinearTransformation(Transformation):
    """One affine map of the concatenation [old, side] -> new (``inner_dim`` is not used)."""

    arch = "LINEAR"

    def __init__(self, old_embedding_dim: int, new_embedding_dim: int, side_info_dim: Optional[int] = None,
                 inner_dim: int = 2048, sigma_dim: int = 1) -> None:
        super().__init__(old_embedding_dim, new_embedding_dim, side_info_dim, inner_dim, sigma_dim)
        self.linear = nn.Linear(old_embedding_dim + self.side_info_dim, new_embedding_dim)

    def forward(self, old: torch.Tensor, side: Optional[torch.Tensor] = None) -> TransformationOutput:
        """(N, old_dim), (N, side_dim) or None -> TransformationOutput(feature (N, new_dim), None)."""
        old, side = self._inputs(old, side)
        return TransformationOutput(self.linear(torch.cat([old, side], dim=1)), None)


TransformationFactory = Callable[..., Transformation]
TRANSFORMATIONS: Registry[TransformationFactory] = Registry("transformation architecture")
for _cls in (MLPSideProjection, MLPSideProjectionSigma, LinearTransformation):
    TRANSFORMATIONS.register(_cls.arch)(_cls)

_PARAM_NAMES = ("old_embedding_dim", "new_embedding_dim", "side_info_dim", "inner_dim", "sigma_dim")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_transformation_params(arch: str, *, old_embedding_dim: Any, new_embedding_dim: Any,
                                side_info_dim: Any = None, inner_dim: Any = 2048, sigma_dim: Any = 1) -> None:
    """Raise ConfigError (naming the ``arch_params`` key) unless these build a transformation."""
    cls = TRANSFORMATIONS.get(arch)
    for key, value in (("old_embedding_dim", old_embedding_dim), ("new_embedding_dim", new_embedding_dim),
                       ("inner_dim", inner_dim), ("sigma_dim", sigma_dim)):
        if not _positive_int(value):
            raise ConfigError(f"arch_params.{key} must be a positive integer, got {value!r}")
    if side_info_dim is not None and not _positive_int(side_info_dim):
        raise ConfigError(f"arch_params.side_info_dim must be a positive integer or null, got {side_info_dim!r}")
    has_uncertainty = getattr(cls, "has_uncertainty", False)
    if has_uncertainty and sigma_dim not in (1, new_embedding_dim):
        raise ConfigError(
            f"arch_params.sigma_dim must be 1 (one variance per sample) or new_embedding_dim="
            f"{new_embedding_dim} (one per dimension), got {sigma_dim}"
        )
    if not has_uncertainty and sigma_dim != 1:
        raise ConfigError(
            f"arch_params.sigma_dim={sigma_dim} is set, but {arch} predicts no uncertainty; "
            "use MLP_BN_SIDE_PROJECTION_SIGMA or drop sigma_dim"
        )


def build_transformation(arch: str, *, old_embedding_dim: int, new_embedding_dim: int,
                         side_info_dim: Optional[int] = None, inner_dim: int = 2048, sigma_dim: int = 1,
                         **unknown: Any) -> Transformation:
    """Build a transformation by name; an unknown name or key raises ConfigError listing the valid ones."""
    if unknown:
        raise ConfigError(
            f"unknown transformation arch_params key(s) {', '.join(sorted(unknown))}; "
            f"valid: arch, {', '.join(_PARAM_NAMES)}"
        )
    check_transformation_params(arch, old_embedding_dim=old_embedding_dim, new_embedding_dim=new_embedding_dim,
                                side_info_dim=side_info_dim, inner_dim=inner_dim, sigma_dim=sigma_dim)
    return TRANSFORMATIONS.get(arch)(old_embedding_dim=old_embedding_dim, new_embedding_dim=new_embedding_dim,
                                     side_info_dim=side_info_dim, inner_dim=inner_dim, sigma_dim=sigma_dim)


def uncertainty_score(log_variance: torch.Tensor) -> torch.Tensor:
    """(N, sigma_dim) log-variances -> (N,) one score per sample (their mean: the log of the
    geometric-mean variance), larger = more uncertain; the FastFill backfilling order sorts by it."""
    return log_variance.float().mean(dim=1)
