"""Backward-compatible weight interpolation (BCWI, protocols.md §7) of two models of one architecture.

``alpha`` is the weight of the OLD model: theta = alpha * theta_old + (1 - alpha) * theta_new,
so alpha 0 is the new model and alpha 1 the old one.

- plain: the formula above for every floating-point tensor of the state dict.
- Fisher-weighted: theta = (alpha F theta_old + (1 - alpha) theta_new) / (alpha F + (1 - alpha)),
  F the old model's diagonal Fisher information (:func:`diagonal_fisher`) for each parameter;
  buffers (BatchNorm statistics) are interpolated plainly.
- soup: the new side is the element-wise mean of several new models (:func:`average_state_dicts`).

Classifier rows of the classes only the new model knows are copied from the new model at every
alpha (the old model's rows for them were never trained). Integer buffers (BatchNorm's
``num_batches_tracked``) come from the new model. After interpolation the BatchNorm running
statistics no longer describe the activations of the interpolated network (the mean of two
networks' statistics is not the statistics of the mean network), so :func:`recompute_bn_stats`
measures them again on training data.
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, Optional

import torch
from torch import nn
from tqdm import tqdm

from fct.errors import UserError

StateDict = Mapping[str, torch.Tensor]


def check_compatible(old: StateDict, new: StateDict, what: str = "the new model") -> None:
    """Raise UserError unless both state dicts have the same keys and shapes."""
    missing = [k for k in old if k not in new]
    extra = [k for k in new if k not in old]
    shapes = [f"{k} {tuple(old[k].shape)} vs {tuple(new[k].shape)}"
              for k in old if k in new and old[k].shape != new[k].shape]
    if missing or extra or shapes:
        detail = "; ".join(x for x in (
            f"keys only in the old model: {', '.join(missing[:3])}" if missing else "",
            f"keys only in {what}: {', '.join(extra[:3])}" if extra else "",
            f"shape mismatch: {', '.join(shapes[:2])}" if shapes else "") if x)
        raise UserError(f"the old model and {what} are not the same architecture ({detail}); "
                        "interpolation needs identical architectures")


def average_state_dicts(states: list[StateDict]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (a "soup"); other tensors from the first."""
    if not states:
        raise ValueError("no state dicts to average")
    for i, s in enumerate(states[1:], start=2):
        check_compatible(states[0], s, f"new model #{i}")
    out: dict[str, torch.Tensor] = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def interpolate_state_dicts(
    old: StateDict,
    new: StateDict,
    alpha: float,
    *,
    fisher: Optional[StateDict] = None,
    new_class_rows: Optional[tuple[int, int]] = None,
    classifier_key: str = "classifier.weight",
) -> dict[str, torch.Tensor]:
    """theta(alpha) from old and new state dicts (same keys and shapes).

    fisher: per-parameter diagonal Fisher of the old model (same shapes, >= 0) for the
    Fisher-weighted variant; tensors without an entry are interpolated plainly. Where
    ``alpha F + (1 - alpha)`` is 0 (alpha 1 and F 0) the plain value (the old weight) is used.
    new_class_rows: (first, stop) rows of ``classifier_key`` taken from the new model.
    alpha 0 returns the new tensors and alpha 1 the old ones exactly (up to the copied rows).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_compatible(old, new)
    out: dict[str, torch.Tensor] = {}
    for k, o in old.items():
        n = new[k]
        if not o.is_floating_point():
            out[k] = n.clone()
        elif alpha == 0.0:
            out[k] = n.clone()
        elif alpha == 1.0:
            out[k] = o.clone()
        elif fisher is not None and k in fisher:
            f = fisher[k].to(torch.float64)
            if f.shape != o.shape:
                raise ValueError(f"Fisher entry {k} has shape {tuple(f.shape)}, the weight {tuple(o.shape)}")
            num = alpha * f * o.double() + (1.0 - alpha) * n.double()
            den = alpha * f + (1.0 - alpha)
            out[k] = (num / den).to(o.dtype)
        else:
            out[k] = (alpha * o.double() + (1.0 - alpha) * n.double()).to(o.dtype)
    if new_class_rows is not None:
        first, stop = new_class_rows
        if classifier_key not in out:
            raise UserError(f"no classifier tensor {classifier_key!r} to take new-class rows from")
        w = out[classifier_key]
        if not 0 <= first <= stop <= w.shape[0]:
            raise UserError(f"new-class rows {first}..{stop - 1} do not fit the classifier's "
                            f"{w.shape[0]} rows")
        w[first:stop] = new[classifier_key][first:stop]
    return out


def diagonal_fisher(
    model: nn.Module,
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    labels: Literal["true", "predicted"] = "true",
    num_classes: Optional[int] = None,
    progress: bool = False,
    total: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` (eval mode: BatchNorm uses its running statistics).

    F_i = mean over samples of (d log p(y | x) / d theta_i)^2, with **per-sample** gradients
    (one backward per image; the squared gradient of a batch mean would instead give
    (sum g)^2 / B^2, mixing samples). y is the sample's true label (``labels='true'``, the
    empirical Fisher) or the model's own top prediction (``'predicted'``). log p is the log-softmax
    over the first ``num_classes`` logits (None: all). ``samples`` yields (images (B, C, H, W),
    labels (B,)) batches. Returns float32 tensors on the CPU, one per parameter name.
    """
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    seen = 0
    bar = tqdm(samples, desc="Fisher", leave=False, dynamic_ncols=True, total=total, disable=not progress)
    for images, y in bar:
        for i in range(images.shape[0]):
            x = images[i:i + 1].to(device)
            logits = model(x).logits.float()
            if num_classes is not None:
                logits = logits[:, :num_classes]
            logp = torch.log_softmax(logits, dim=1)
            target = logp.argmax(1) if labels == "predicted" else y[i:i + 1].to(device)
            grads = torch.autograd.grad(logp[0, target[0]], list(params.values()))
            for (k, _), g in zip(params.items(), grads):
                acc[k] += g.double().square()
            seen += 1
    bar.close()
    if seen == 0:
        raise UserError("no training samples to compute the Fisher information on")
    return {k: (v / seen).float().cpu() for k, v in acc.items()}


def normalize_fisher(fisher: Mapping[str, torch.Tensor],
                     how: Literal["mean", "max", "none"]) -> dict[str, torch.Tensor]:
    """Rescale a diagonal Fisher by one constant: its mean or max over all entries (or not).

    The raw scale depends on the loss and the model (typical entries are far below 1), so
    in ``alpha F / (alpha F + 1 - alpha)`` it would pull every alpha < 1 towards the new model;
    after ``'mean'`` a weight of average importance is interpolated exactly as in plain BCWI.
    """
    if how == "none":
        return dict(fisher)
    if how not in ("mean", "max"):
        raise ValueError(f"unknown Fisher normalisation {how!r}")
    flat = torch.cat([v.flatten().double() for v in fisher.values()])
    scale = float(flat.mean() if how == "mean" else flat.max())
    if scale <= 0:
        raise UserError("the Fisher information is zero everywhere (a model with a constant output?)")
    return {k: v / scale for k, v in fisher.items()}


def new_class_rows(old_classes: int, new_classes: int) -> Optional[tuple[int, int]]:
    """Rows (first, stop) of the classes only the new model knows, or None."""
    return (old_classes, new_classes) if new_classes > old_classes else None


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                       *, progress: bool = False, total: Optional[int] = None) -> int:
    """Replace every BatchNorm's running mean/var by the statistics of ``batches`` (images (B, ...)).

    Running stats are reset and momentum set to None (a cumulative average over the batches,
    each batch weighted equally), then the model runs in train mode without gradients; momentum
    is restored and the model left in eval mode. Returns the number of BatchNorm layers
    (0: nothing to do, the batches are not read).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        model.eval()
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for x in tqdm(batches, desc="BN stats", leave=False, dynamic_ncols=True, total=total,
                      disable=not progress):
            model(x.to(device))
            seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if seen == 0:
        raise UserError("no training batches to recompute the BatchNorm statistics on")
    return len(bns)
