"""The one training driver, ``fit``, and the plain training and validation loops it runs.

A trainer (backbone, SimCLR, BCT, backward maps, transformation) builds its model and data and
describes itself as a ``Trainer``: how a batch becomes a loss and how the model is validated.
``fit`` does everything else the same way for all of them: optimizer, schedule and scaler, resume
from the run folder's checkpoint, DDP and ``torch.compile``, the epoch loop with the per-epoch
seeding that makes resume and DDP exact, the non-finite guard, the checkpoint, the JSON and
TensorBoard logs and the console line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fct import dist
from fct.errors import RunError
from fct.optim import build_optimizer, build_schedule, set_lr
from fct.runtime import Runtime, wrap_ddp
from fct.training.run_folder import RunFolder
from fct.training.runlog import RunLog

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

    Returns averages over all processes: loss, top-1 (%, only when the step gives logits), lr,
    samples/s.
    """
    steps = len(loader)  # type: ignore[arg-type]
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    seen = 0
    with_logits = False
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
            with_logits = True
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
    out = {"train_loss": totals[0].item() / n}
    if with_logits:
        out["train_top1"] = 100.0 * totals[1].item() / n
    return {**out, "lr": lr, "images_per_s": n / elapsed, "epoch_time_s": elapsed}


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


class Epochs(Protocol):
    """Batches of one epoch at a time: ``set_epoch(e)`` fixes the order and augmentation."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass
class Trainer:
    """What one kind of training supplies to ``fit``.

    model: the module trained and checkpointed (not yet on DDP); ``fit`` trains it in place.
    batches: the training batches, epoch by epoch.
    make_step: the StepFn for the module as ``fit`` runs it (DDP- and compile-wrapped).
    validate: (model, epoch) -> validation metrics (the unwrapped model; may return {}).
    describe: (epoch, train metrics, validation metrics) -> the console line of an epoch.
    before_epoch: (wrapped model, epoch), after ``train()``: e.g. freeze BatchNorm statistics.
    train_extras: metrics of the epoch the step gathered itself (e.g. loss components).
    extra_state: kept in every checkpoint beside the last metrics (e.g. where the run started from).
    """

    model: nn.Module
    batches: Epochs
    make_step: Callable[[nn.Module], StepFn]
    validate: Callable[[nn.Module, int], dict[str, float]]
    describe: Callable[[int, dict[str, float], dict[str, float]], str]
    before_epoch: Optional[Callable[[nn.Module, int], None]] = None
    train_extras: Optional[Callable[[], dict[str, float]]] = None
    extra_state: dict[str, Any] = field(default_factory=dict)


def fit(trainer: Trainer, cfg: Any, run: RunFolder, rt: Runtime, config: dict) -> dict[str, Any]:
    """Train ``trainer.model`` for ``cfg.epochs`` epochs, resuming from ``run``'s checkpoint.

    cfg: a training config (``epochs``, ``seed``, ``optimizer_params``, ``lr_policy_params``,
    ``runtime``); config: its resolved dict (kept in the checkpoint, compared on resume).
    Returns the last epoch's record (the checkpoint's on a finished run)."""
    model = trainer.model
    optimizer = build_optimizer(model, cfg.optimizer_params)
    scaler = torch.amp.GradScaler("cuda") if rt.uses_scaler else None
    start, last = run.checkpointer.resume(model, optimizer, scaler, config, cfg.epochs)
    net = wrap_ddp(model, rt)
    if cfg.runtime.compile:
        net = torch.compile(net)
    step_fn = trainer.make_step(net)
    lr_at = build_schedule(cfg.lr_policy_params, cfg.optimizer_params.lr, cfg.epochs)
    log = RunLog(run.path, tensorboard=cfg.runtime.tensorboard, resume_epoch=start)
    try:
        for epoch in range(start, cfg.epochs):
            trainer.batches.set_epoch(epoch)
            # The model's own randomness (if any) is also a function of (seed, epoch) only.
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            net.train()
            if trainer.before_epoch is not None:
                trainer.before_epoch(net, epoch)
            train = train_one_epoch(step_fn, trainer.batches, optimizer, lr_at, epoch, rt, scaler)
            if trainer.train_extras is not None:
                train.update(trainer.train_extras())
            metrics = trainer.validate(model, epoch)
            last = {"epoch": epoch, **train, **metrics, "time": time.time()}
            run.checkpointer.save(epoch=epoch + 1, model=net, optimizer=optimizer, scaler=scaler, config=config,
                                  extra={"last": last, **trainer.extra_state})
            log.log_epoch(last)
            if dist.is_main():
                print(trainer.describe(epoch, train, metrics), flush=True)
    finally:
        log.close()
    return last
