"""The plain training and validation loops."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fct import dist
from fct.errors import RunError
from fct.optim import set_lr
from fct.runtime import Runtime

# step_fn(batch) -> (scalar loss, logits or None, labels): one forward pass of whatever is trained
StepFn = Callable[[Any], tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]


def image_step(model: nn.Module, rt: Runtime,
               loss_fn: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]) -> StepFn:
    """StepFn for (images, labels) batches: ``loss_fn(model(images), labels) -> (loss, logits)``."""

    def step(batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        images, labels = batch
        labels = labels.to(rt.device, non_blocking=True)
        loss, logits = loss_fn(model(rt.to_input(images)), labels)
        return loss, logits, labels

    return step


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum).item():  # a host sync: done every few steps only
        raise RunError(
            f"non-finite training loss at epoch {epoch}, step {step}; the last good checkpoint is "
            "kept. Lower optimizer_params.lr, use precision fp32, or check the data"
        )


def train_one_epoch(
    step_fn: StepFn,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[float], float],
    epoch: int,
    rt: Runtime,
    scaler: Optional[torch.amp.GradScaler] = None,
    check_every: int = 10,
) -> dict[str, float]:
    """One epoch of optimisation over ``loader``; the caller puts the model in train mode.

    Returns averages over all processes: loss, top-1 (%, when the step gives logits), lr, samples/s.
    """
    steps = len(loader)  # type: ignore[arg-type]
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=dist.progress_disabled(rt.params.progress))
    lr = lr_at(float(epoch))
    for step, batch in enumerate(bar):
        lr = lr_at(epoch + step / steps)
        set_lr(optimizer, lr)
        with rt.autocast():
            loss, logits, labels = step_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().float() * labels.shape[0]
        if logits is not None:
            correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if (step + 1) % check_every == 0 or step + 1 == steps:
            _check_finite(loss_sum, epoch, step)
            if not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.4g}")
    bar.close()
    if seen == 0:
        raise RunError("the training loader produced no batch (batch larger than the data?)")
    elapsed = time.perf_counter() - t0
    totals = dist.all_reduce_sum(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=rt.device)]))
    n = totals[2].item()
    return {
        "train_loss": totals[0].item() / n,
        "train_top1": 100.0 * totals[1].item() / n,
        "lr": lr,
        "images_per_s": n / elapsed,
        "epoch_time_s": elapsed,
    }


@torch.inference_mode()
def evaluate_classification(model: nn.Module, loader: DataLoader, rt: Runtime,
                            num_classes: Optional[int] = None) -> dict[str, float]:
    """Top-1/top-5 (%) and cross-entropy of the classifier on ``loader`` (summed over processes).

    num_classes: score only the first ``num_classes`` logits (the classes trained on).
    """
    model.eval()
    stats = torch.zeros(4, device=rt.device, dtype=torch.float64)  # loss, top1, top5, n
    for images, labels in tqdm(loader, desc="validate", leave=False, dynamic_ncols=True,
                               disable=dist.progress_disabled(rt.params.progress)):
        images, labels = rt.to_input(images), labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(images).logits
        logits = logits.float()
        if num_classes is not None:
            logits = logits[:, :num_classes]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        stats += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(1).sum().double(),
            torch.tensor(float(labels.shape[0]), device=rt.device, dtype=torch.float64),
        ])
    stats = dist.all_reduce_sum(stats)
    n = max(stats[3].item(), 1.0)
    loss = stats[0].item() / n
    return {
        "val_loss": loss if math.isfinite(loss) else float("nan"),
        "val_top1": 100.0 * stats[1].item() / n,
        "val_top5": 100.0 * stats[2].item() / n,
    }
