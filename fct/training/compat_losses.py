"""Compatibility objectives of ``train_backbone.py`` (protocols.md §5).

BCT (``bct_params``): the new embedding also has to classify through the old model's frozen
classifier, L = CE(W_new phi_new(x), y) + lambda * CE(W_old' phi_new(x), y). W_old' holds the old
classifier's trained rows and, for every class the old model never saw, a synthesised row: the
mean old-model embedding of that class's training images, by default rescaled to the mean norm of
the trained rows (``synthesised_rows``). The old model runs once, before training; a step costs one
extra (N, D) x (D, C) product.

Learned backward maps (``backward_params``, BC-Aligner): version k's backbone is trained jointly
with a light map B_k: z_k -> z_{k-1}; with the frozen older maps B_{k-1}, ..., B_1 and the frozen
older models M_{k-1}, ..., M_0 the loss adds
lambda * sum_{j<k} mean((B_{j+1} o ... o B_k)(z_k) - z_j)^2, the mean over the batch and the
dimensions of version j (the FCT "mse"). The backbone and B_k are one module
(:class:`BackwardAlignedModel`), so one optimizer, one DDP wrapper and one checkpoint hold both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fct import dist
from fct.data.datasets import LabelledSubset
from fct.errors import UserError
from fct.io import file_sha256
from fct.models import is_torchscript_file, load_model_file, read_model_file
from fct.runtime import Runtime
from fct.training.loaders import eval_loader
from fct.training.loop import StepFn
from fct.transformations import Transformation, build_transformation

Stats = tuple[Sequence[float], Sequence[float]]  # a data set's (mean, std) per channel

# --------------------------------------------------------------------------------------------
# The losses (pure functions)
# --------------------------------------------------------------------------------------------


def class_mean_features(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Mean feature of each class: features (N, D), labels (N,) -> (len(classes), D), float32.

    Raises UserError when a class has no sample (its row could not be synthesised)."""
    sums, counts = class_feature_sums(features, labels, classes)
    return class_means_from_sums(sums, counts, classes)


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor,
                       classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (len(classes), D) float64 and counts (len(classes),) float64; samples of
    other classes are ignored."""
    classes_t = torch.as_tensor(list(classes), device=features.device, dtype=torch.long)
    hit = labels.to(features.device)[:, None] == classes_t[None, :]  # (N, C)
    onehot = hit.to(torch.float64)
    return onehot.T @ features.to(torch.float64), onehot.sum(0)


def class_means_from_sums(sums: torch.Tensor, counts: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(C, D) sums / (C,) counts -> (C, D) float32 means; UserError for a class without samples."""
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty:
        raise UserError(f"bct_params: class {empty[0]} has no training image, so the old classifier row "
                        "of this class cannot be synthesised (mean old-model feature of the class)")
    return (sums / counts[:, None]).float()


def influence_loss(embedding: torch.Tensor, old_classifier: torch.Tensor, labels: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """BCT's influence loss CE(W_old' phi_new(x), y): embedding (N, D), old_classifier (C, D),
    labels (N,) in 0..C-1 -> scalar (computed in float32)."""
    logits = embedding.float() @ old_classifier.float().T
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def composed_alignment_losses(mapped: torch.Tensor, previous_maps: Sequence[nn.Module],
                              previous_embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The BC-Aligner terms, one per older version, newest first.

    mapped: B_k(z_k), (N, d_{k-1}); previous_maps: [B_{k-1}, ..., B_1] (each z_j -> z_{j-1});
    previous_embeddings: [z_{k-1}, ..., z_0]. Term i is mean((B_{k-i} o ... o B_k)(z_k) - z_{k-1-i})^2.
    """
    if len(previous_maps) != len(previous_embeddings) - 1:
        raise ValueError(f"{len(previous_embeddings)} older versions need {len(previous_embeddings) - 1} "
                         f"older maps, got {len(previous_maps)}")
    losses = []
    x = mapped.float()
    for i, z in enumerate(previous_embeddings):
        if i > 0:
            x = map_features(previous_maps[i - 1], x).float()
        losses.append(F.mse_loss(x, z.float()))
    return losses


def map_features(backward_map: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """(N, d_j) -> (N, d_{j-1}) through a map that is a transformation (output ``.feature``) or a
    plain module."""
    out = backward_map(z)
    return getattr(out, "feature", out)


# --------------------------------------------------------------------------------------------
# The trained module and the step
# --------------------------------------------------------------------------------------------


class BackwardAlignedOutput(NamedTuple):
    embedding: torch.Tensor  # (N, d_k): the backbone's embedding z_k
    logits: Optional[torch.Tensor]  # (N, num_classes)
    mapped: torch.Tensor  # (N, d_{k-1}): B_k(z_k)


class BackwardAlignedModel(nn.Module):
    """Backbone + its backward map B_k as one module (one optimizer, DDP wrapper and checkpoint).

    Save ``model.backbone`` as the model and ``model.backward_map`` as the map file."""

    def __init__(self, backbone: nn.Module, backward_map: Transformation) -> None:
        super().__init__()
        self.backbone = backbone
        self.backward_map = backward_map

    def forward(self, x: torch.Tensor) -> BackwardAlignedOutput:
        """(N, 3, H, W) -> BackwardAlignedOutput(embedding (N, d_k), logits (N, C), mapped (N, d_{k-1}))."""
        out = self.backbone(x)
        return BackwardAlignedOutput(out.embedding, out.logits, map_features(self.backward_map, out.embedding))


def build_backward_map(new_dim: int, old_dim: int) -> Transformation:
    """B_k: a LINEAR transformation from version k's d_k to version k-1's d_{k-1} (applied with no
    side-information feature, so it maps z_k alone)."""
    return build_transformation("LINEAR", old_embedding_dim=new_dim, new_embedding_dim=old_dim)


class LossMeter:
    """Per-component loss sums kept on the device (no host sync per step), averaged per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), device=device)

    def add(self, n: int, **values: torch.Tensor) -> None:
        """Add one batch of ``n`` samples whose mean component losses are ``values``."""
        for name, v in values.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros((), device=self.device)
            self.sums[name] += v.detach().float() * n
        self.count += n

    def averages(self) -> dict[str, float]:
        """Means over the epoch and all processes (a collective: every rank calls it); resets."""
        names = sorted(self.sums)
        if not names:
            return {}
        totals = dist.all_reduce_sum(torch.stack([self.sums[k] for k in names] + [self.count]))
        n = max(totals[-1].item(), 1.0)
        out = {k: totals[i].item() / n for i, k in enumerate(names)}
        self.sums, self.count = {}, torch.zeros((), device=self.device)
        return out


def compatible_step(model: nn.Module, rt: Runtime, *, label_smoothing: float,
                    bct: Optional["BCTReference"], previous: Optional["PreviousVersions"],
                    meter: LossMeter) -> StepFn:
    """StepFn for (images, labels) batches: task CE + lambda * influence loss (BCT) +
    lambda * composed alignment (backward maps). The older models run frozen, in eval mode."""

    def step(batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        images, labels = batch
        x = rt.to_input(images)
        labels = labels.to(rt.device, non_blocking=True)
        out = model(x)
        logits = out.logits.float()
        task = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        loss, parts = task, {"train_task_loss": task}
        if bct is not None:
            infl = influence_loss(out.embedding, bct.classifier, labels, label_smoothing)
            loss = loss + bct.weight * infl
            parts["train_influence_loss"] = infl
        if previous is not None:
            with torch.no_grad():
                zs = [m(x).embedding.flatten(1) for m in previous.models]
            terms = composed_alignment_losses(out.mapped, previous.maps, zs)
            align = torch.stack(terms).sum()
            loss = loss + previous.weight * align
            parts["train_align_loss"] = align
            parts.update({f"train_align_loss_back{i + 1}": t for i, t in enumerate(terms)})
        meter.add(labels.shape[0], **parts)
        return loss, logits, labels

    return step


# --------------------------------------------------------------------------------------------
# Loading the older versions
# --------------------------------------------------------------------------------------------


def _embedding_dim(model: nn.Module, probe: torch.Tensor) -> int:
    """The model's embedding width: declared, or measured on one probe image (1, 3, H, W)."""
    dim = getattr(model, "embedding_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.no_grad():  # the model and the probe are both still on the CPU here
        return int(model(probe).embedding.flatten(1).shape[1])


def _frozen(model: nn.Module, rt: Runtime) -> nn.Module:
    return rt.prepare_model(model).eval().requires_grad_(False)


def _file_meta(path: Path) -> dict[str, Any]:
    """The meta of an fct model file ({} for a TorchScript file)."""
    return {} if is_torchscript_file(path) else read_model_file(path)["meta"]


@dataclass
class BCTReference:
    """The frozen W_old' (C, D) on the device, lambda, and the record kept in model meta."""

    classifier: torch.Tensor
    weight: float
    record: dict[str, Any]


def old_classifier_rows(path: Path, embedding_dim: int, probe: torch.Tensor,
                        input_stats: Optional[Stats] = None) -> tuple[nn.Module, torch.Tensor, int]:
    """Load the BCT old model: (model (CPU, eval), its trained classifier rows (C_old, D), C_old).

    Rows: the first ``trained_classes`` (from the file's meta) of its classifier, else all rows.
    UserError: missing file, no classifier (or an untrained one), another embedding width."""
    if not path.is_file():
        raise UserError(f"bct_params.old_model_path: model file {path} does not exist")
    old = load_model_file(path, example_input=probe, input_stats=input_stats)
    meta = _file_meta(path)
    classifier = getattr(old, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise UserError(f"bct_params.old_model_path: {path} has no classifier, which the influence loss needs")
    if meta.get("label_free"):
        raise UserError(f"bct_params.old_model_path: {path} was trained label-free; its classifier is untrained")
    dim = _embedding_dim(old, probe)
    if dim != embedding_dim:
        raise UserError(f"bct_params.old_model_path: {path} gives {dim}-d embeddings but the new model "
                        f"{embedding_dim}-d (arch_params.embedding_dim); BCT trains the new embedding in "
                        "the old space, so the widths must match")
    weight = classifier.weight.detach().float().cpu()
    trained = meta.get("trained_classes")
    c_old = trained if isinstance(trained, int) and 1 <= trained <= weight.shape[0] else weight.shape[0]
    return old, weight[:c_old], c_old


@torch.no_grad()
def old_class_means(old: nn.Module, dataset: Any, classes: Sequence[int], dim: int, rt: Runtime, *,
                    batch_size: int, num_workers: int) -> torch.Tensor:
    """Mean old-model embedding of each class in ``classes`` over ``dataset`` (unaugmented images
    with ``.labels``): (len(classes), D). Each process embeds its shard; sums are reduced."""
    keep = np.flatnonzero(np.isin(np.asarray(dataset.labels), np.asarray(list(classes))))
    subset = LabelledSubset(dataset, keep)
    loader = eval_loader(subset, global_batch=batch_size, num_workers=num_workers,
                         pin_memory=rt.device.type == "cuda")
    sums = torch.zeros(len(classes), dim, dtype=torch.float64, device=rt.device)
    counts = torch.zeros(len(classes), dtype=torch.float64, device=rt.device)
    for images, labels in tqdm(loader, desc="BCT: old class means", leave=False, dynamic_ncols=True,
                               disable=dist.progress_disabled(rt.params.progress)):
        with rt.autocast():
            z = old(rt.to_input(images)).embedding.flatten(1).float()
        s, n = class_feature_sums(z, labels.to(rt.device), classes)
        sums += s
        counts += n
    sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
    return class_means_from_sums(sums.cpu(), counts.cpu(), classes)


def build_bct_reference(path: Path, weight: float, embedding_dim: int, num_classes: int, mean_set: Any,
                        rt: Runtime, *, batch_size: int, num_workers: int,
                        synthesised_rows: str = "scaled",
                        input_stats: Optional[Stats] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """W_old' (max(C_old, K), D) on the CPU and the record {old_model_path, old_sha256,
    influence_weight, old_trained_classes, synthesised_classes, synthesised_rows}; K = classes
    trained now. ``mean_set``: the training images, unaugmented, for the synthesised rows;
    ``synthesised_rows``: "scaled" or "mean" (:func:`synthesised_rows`); ``input_stats``: the data
    set's (mean, std) (see :func:`fct.models.load_model_file`)."""
    old, rows, c_old = old_classifier_rows(path, embedding_dim, mean_set[0][0][None], input_stats)
    new_classes = list(range(c_old, num_classes))
    if new_classes:
        old = _frozen(old, rt)
        means = old_class_means(old, mean_set, new_classes, embedding_dim, rt, batch_size=batch_size,
                                num_workers=num_workers)
        rows = torch.cat([rows, synthesised_rows_from(means, rows, synthesised_rows)], dim=0)
    record = {"old_model_path": str(path), "old_sha256": file_sha256(path), "influence_weight": weight,
              "old_trained_classes": c_old, "synthesised_classes": new_classes,
              "synthesised_rows": synthesised_rows}
    return rows, record


def synthesised_rows_from(means: torch.Tensor, trained_rows: torch.Tensor, mode: str) -> torch.Tensor:
    """The old classifier's rows for classes it never saw, from their mean old features (C_new, D).

    "mean": the means themselves. "scaled": each mean rescaled to the mean norm of the trained rows
    (C_old, D), so the synthesised logits are on the trained logits' scale (post-ReLU class means
    are several times longer than trained rows and nearly parallel: raw, they swamp the loss)."""
    if mode == "mean":
        return means
    if mode != "scaled":
        raise ValueError(f"synthesised rows: unknown mode {mode!r} (scaled, mean)")
    target = trained_rows.norm(dim=1).mean()
    return means * (target / means.norm(dim=1, keepdim=True).clamp_min(1e-12))


@dataclass
class PreviousVersions:
    """Frozen older models [M_{k-1}, ..., M_0] and maps [B_{k-1}, ..., B_1] on the device."""

    models: list[nn.Module]
    maps: list[nn.Module]
    dims: list[int]  # [d_{k-1}, ..., d_0]
    weight: float
    record: dict[str, Any]


def load_previous_versions(model_paths: Sequence[str], map_paths: Sequence[str], weight: float,
                           probe: torch.Tensor, rt: Runtime, input_stats: Optional[Stats] = None) -> PreviousVersions:
    """Load and check the older versions of ``backward_params`` (UserError names the key and file).

    Map i (B_{k-1-i}) must take model i's width to model i+1's width."""
    if len(map_paths) != len(model_paths) - 1:
        raise UserError(f"backward_params: {len(model_paths)} previous_model_paths need "
                        f"{len(model_paths) - 1} previous_map_paths (B_(k-1) .. B_1), got {len(map_paths)}")
    models, dims = [], []
    for i, p in enumerate(map(Path, model_paths)):
        if not p.is_file():
            raise UserError(f"backward_params.previous_model_paths[{i}]: model file {p} does not exist")
        if not is_torchscript_file(p) and read_model_file(p)["kind"] == "transformation":
            raise UserError(f"backward_params.previous_model_paths[{i}]: {p} is a transformation (it maps "
                            "features), not a model of images")
        m = load_model_file(p, example_input=probe, input_stats=input_stats)
        dims.append(_embedding_dim(m, probe))
        models.append(_frozen(m, rt))
    maps = []
    for i, p in enumerate(map(Path, map_paths)):
        key = f"backward_params.previous_map_paths[{i}]"
        if not p.is_file():
            raise UserError(f"{key}: map file {p} does not exist")
        if is_torchscript_file(p) or read_model_file(p)["kind"] != "transformation":
            raise UserError(f"{key}: {p} is not a transformation file (write maps with backward_params."
                            "output_map_path or train_transformation.py)")
        b = load_model_file(p)
        src, dst = b.old_embedding_dim, b.new_embedding_dim
        if b.side_info_dim != src:
            raise UserError(f"{key}: {p} needs a side-information feature (side_info_dim={b.side_info_dim}); "
                            "a backward map takes the newer embedding alone")
        if (src, dst) != (dims[i], dims[i + 1]):
            raise UserError(f"{key}: {p} maps {src}-d to {dst}-d embeddings, but it must map "
                            f"previous_model_paths[{i}] ({dims[i]}-d) to previous_model_paths[{i + 1}] "
                            f"({dims[i + 1]}-d)")
        maps.append(_frozen(b, rt))
    record = {"previous_model_paths": [str(p) for p in model_paths],
              "previous_model_sha256": [file_sha256(p) for p in model_paths],
              "previous_map_paths": [str(p) for p in map_paths],
              "previous_map_sha256": [file_sha256(p) for p in map_paths],
              "weight": weight}
    return PreviousVersions(models, maps, dims, weight, record)
