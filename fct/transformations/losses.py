"""Losses that train a transformation h (protocols.md §3).

Similarity (registry :data:`SIMILARITY_LOSSES`): each returns *per-element terms* of shape (N, D)
or (N, 1) whose mean over the last dimension is the per-sample loss and whose overall mean is the
batch loss: ``mse`` (h - new)^2, ``l1`` |h - new|, ``cosine`` 1 - cos(h, new) (the real cosine,
with L2 norms).

Discriminative (registry :data:`DISCRIMINATIVE_LOSSES`): per-sample cross-entropy of the *new*
model's classifier applied to h's output, W_new(h). The classifier is frozen: it is called with
detached parameters, so gradients reach h but never W_new, whatever its ``requires_grad``.

Uncertainty (FastFill), with s the predicted log-variance (N, K), K = sigma_dim:
    L_ik  = mu_similarity * sim_ik + mu_disc * disc_i
    total = mean_{i,k} [0.5 * exp(-s_ik) * L_ik + mu_uncertainty * s_ik]
With K = 1, sim_i1 is the per-sample similarity and this is the FastFill loss
mean_i [0.5 exp(-s_i) L_i + mu_unc s_i]. With K = new_dim (one variance per dimension), sim_ik is
the per-dimension term ((h_k - new_k)^2 for mse: the heteroscedastic Gaussian NLL) and the
per-sample discriminative term is shared by all k; for ``cosine``, which has no per-dimension
term, the per-sample value is used for every k. When all s_ik of a sample are equal the K = D
loss equals the K = 1 loss. Minimising over s gives exp(s_ik) = L_ik / (2 mu_uncertainty).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fct.errors import ConfigError
from fct.registry import Registry
from fct.config import DiscriminativeLossParams, ObjectiveParams
from fct.transformations.heads import TransformationOutput

SimilarityTerms = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SIMILARITY_LOSSES: Registry[SimilarityTerms] = Registry("similarity loss")


@SIMILARITY_LOSSES.register("mse")
def mse_terms(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N, D) squared differences."""
    return (h - target).square()


@SIMILARITY_LOSSES.register("l1")
def l1_terms(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N, D) absolute differences."""
    return (h - target).abs()


@SIMILARITY_LOSSES.register("cosine")
def cosine_terms(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N, 1): 1 - cos(h, target), with L2 norms."""
    return (1.0 - F.cosine_similarity(h, target, dim=1, eps=1e-8)).unsqueeze(1)


def similarity_per_sample(name: str, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,) per-sample similarity loss (computed in float32)."""
    return SIMILARITY_LOSSES.get(name)(h.float(), target.float()).mean(dim=1)


def similarity_loss(name: str, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch similarity loss: the mean over samples (and dimensions) of the per-element terms."""
    return similarity_per_sample(name, h, target).mean()


DiscriminativeLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DISCRIMINATIVE_LOSSES: Registry[DiscriminativeLoss] = Registry("discriminative loss")


@DISCRIMINATIVE_LOSSES.register("LabelSmoothing")
def label_smoothing_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(N, C) logits, (N,) labels -> (N,) (1 - e) * NLL + e * mean_c(-log p_c)."""
    return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)


@DISCRIMINATIVE_LOSSES.register("CE")
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(N, C) logits, (N,) labels -> (N,) plain cross-entropy (``smoothing`` is 0 for CE)."""
    return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)


def frozen_logits(classifier: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, C) = classifier(h) with the classifier's parameters detached: the gradient
    flows into h only."""
    params = {name: p.detach() for name, p in classifier.named_parameters()}
    return functional_call(classifier, params, (h,))


def discriminative_per_sample(params: DiscriminativeLossParams, h: torch.Tensor, labels: torch.Tensor,
                              new_classifier: nn.Module) -> torch.Tensor:
    """(N, D) h, (N,) labels -> (N,) cross-entropy of the frozen new classifier on h."""
    return DISCRIMINATIVE_LOSSES.get(params.name)(frozen_logits(new_classifier, h), labels, params.smoothing)


def uncertainty_loss(log_variance: torch.Tensor, per_element_loss: torch.Tensor,
                     mu_uncertainty: float) -> torch.Tensor:
    """mean [0.5 * exp(-s) * L + mu_uncertainty * s] over samples and variance dimensions.

    log_variance s: (N, K); per_element_loss L: (N, K) or (N, 1) (broadcast over K).
    """
    s = log_variance.float()
    return (0.5 * torch.exp(-s) * per_element_loss + mu_uncertainty * s).mean()


def transformation_loss(output: TransformationOutput, new_feature: torch.Tensor, labels: Optional[torch.Tensor],
                        new_classifier: Optional[nn.Module],
                        params: ObjectiveParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of h and its parts for logging.

    output: h's output (feature (N, D), log_variance (N, K) or None); new_feature: (N, D) target;
    labels: (N,) int64 (needed with a discriminative loss); new_classifier: the new model's
    classifier (frozen here). Returns (scalar loss, {'loss', 'similarity', 'discriminative'?,
    'log_variance'?}), the parts being batch means (one host sync for all of them).
    """
    sim_p, disc_p, unc_p = params.similarity_loss, params.discriminative_loss, params.uncertainty_loss
    h = output.feature
    if h.shape != new_feature.shape:
        raise ConfigError(
            f"the transformation outputs {tuple(h.shape)} but the new features are {tuple(new_feature.shape)}; "
            "check arch_params.new_embedding_dim"
        )
    if unc_p is not None and output.log_variance is None:
        raise ConfigError("objective_params.uncertainty_loss needs a transformation that predicts an "
                          "uncertainty (MLP_BN_SIDE_PROJECTION_SIGMA)")
    sim_terms = SIMILARITY_LOSSES.get(sim_p.name)(h.float(), new_feature.float())  # (N, D) or (N, 1)
    sim = sim_terms.mean(dim=1)  # (N,)
    parts: dict[str, torch.Tensor] = {"similarity": sim.mean()}

    disc: Optional[torch.Tensor] = None  # (N,) weighted by mu_disc
    if disc_p is not None:
        if new_classifier is None:
            raise ConfigError("objective_params.discriminative_loss needs the new model's classifier, but the new "
                              "model has none (e.g. a TorchScript file without 'model.fc')")
        if labels is None:
            raise ConfigError("objective_params.discriminative_loss needs the labels of the batch")
        ce = discriminative_per_sample(disc_p, h, labels, new_classifier)  # (N,)
        parts["discriminative"] = ce.mean()
        disc = disc_p.mu_disc * ce

    if unc_p is None:
        loss = sim_p.mu_similarity * parts["similarity"]
        if disc is not None:
            loss = loss + disc.mean()
    else:
        s = output.log_variance
        assert s is not None  # checked above
        k = s.shape[1]
        per_element = sim_terms if sim_terms.shape[1] == k else sim.unsqueeze(1)  # (N, K) or (N, 1)
        per_element = sim_p.mu_similarity * per_element
        if disc is not None:
            per_element = per_element + disc.unsqueeze(1)
        loss = uncertainty_loss(s, per_element, unc_p.mu_uncertainty)
        parts["log_variance"] = s.detach().float().mean()

    names = ["loss", *parts]
    values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).tolist()
    return loss, dict(zip(names, values))
