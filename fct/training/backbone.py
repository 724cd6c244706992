"""``train_backbone.py``: train an embedding model, resumably, on 1..N processes.

Supervised (the default): cross-entropy through the backbone's classifier, validated by top-1/top-5.
Label-free (``ssl_params``): SimCLR on two augmented views per image, the backbone wrapped with a
projection head (``fct.ssl.SimCLRModel``) and validated by a k-NN monitor; only the backbone is
saved, for use as a side-information model.
Compatibility objectives (supervised only, ``fct.training.compat_losses``): ``bct_params`` adds
BCT's influence loss against an old model's classifier; ``backward_params`` trains a linear map
to the previous version jointly with the backbone (written to its own file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

import fct
from fct import dist
from fct.config.loader import to_dict
from fct.config import BackboneConfig
from fct.data import build_dataset, dataset_info
from fct.data.datasets import take_fraction
from fct.errors import UserError
from fct.io import file_sha256
from fct.models import build_backbone, expect_inputs, read_model_file, save_model_file, save_transformation, unwrap_model
from fct.runtime import Runtime, make_runtime, seed_everything
from fct.ssl import ProjectionHead, SimCLRModel, build_two_view_dataset, evaluate_knn, simclr_loss_fn, two_view_collate
from fct.training.checkpoint import Checkpointer
from fct.training.compat_losses import (
    BackwardAlignedModel,
    BCTReference,
    LossMeter,
    PreviousVersions,
    Stats,
    build_backward_map,
    build_bct_reference,
    compatible_step,
    load_previous_versions,
)
from fct.training.loaders import check_global_batch, eval_loader, train_loader
from fct.training.loop import StepFn, Trainer, evaluate_classification, fit, image_step
from fct.training.run_folder import open_run_folder


def classification_loss(label_smoothing: float):
    def loss_fn(out, labels: torch.Tensor):
        logits = out.logits
        return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), logits

    return loss_fn


# --------------------------------------------------------------------------------------------
# init_from
# --------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def apply_init_from(model: nn.Module, path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Copy the weights of the backbone model file ``path`` into ``model`` (a backbone), in place.

    Every parameter and buffer must exist in both under the same name with the same shape, except
    the classifier, which may be wider in ``model`` (more classes): the file's C_old rows fill
    rows 0..C_old-1 and the other rows keep their initialisation. Everything is checked before
    anything is copied. Returns ``{"path", "sha256"}`` for the run's records.
    Raises UserError (naming the file, the key and both shapes) on any other mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"init_from: model file {p} does not exist")
    data = read_model_file(p)  # weights_only; refuses anything that is not an fct model file
    if data["kind"] != "backbone":
        raise UserError(f"init_from: {p} holds a {data['kind']!r} model, not a backbone")
    target = unwrap_model(model)
    file_arch, model_arch = data["arch_params"].get("arch"), getattr(target, "arch", None)
    if model_arch is not None and file_arch != model_arch:
        raise UserError(f"init_from: {p} is a {file_arch} but arch_params.arch is {model_arch}")
    source = data["state_dict"]
    dest = target.state_dict()
    classifier = getattr(target, "classifier", None)
    widenable = {f"{name}." for name, m in target.named_modules() if classifier is not None and m is classifier}

    for key, t in dest.items():
        if key not in source:
            raise UserError(f"init_from: {p} has no {key} (model shape {_shape(t)}); is it another architecture?")
        s = source[key]
        if _shape(s) == _shape(t):
            continue
        wider = (any(key.startswith(w) for w in widenable) and s.dim() == t.dim() and s.dim() >= 1
                 and s.shape[0] <= t.shape[0] and s.shape[1:] == t.shape[1:])
        if not wider:
            raise UserError(f"init_from: {key} has shape {_shape(s)} in {p} but {_shape(t)} in the model")
    extra = sorted(set(source) - set(dest))
    if extra:
        raise UserError(f"init_from: {p} has {extra[0]} (shape {_shape(source[extra[0]])}) which the model lacks")

    with torch.no_grad():
        for key, t in dest.items():  # state_dict tensors share storage with the model
            s = source[key]
            if s.dim() == 0:
                t.copy_(s)
            else:
                t[: s.shape[0]].copy_(s)  # the whole tensor, or a wider classifier's first rows
    return {"path": str(p), "sha256": file_sha256(p)}


def _init_from(cfg: BackboneConfig, backbone: nn.Module, ckpt: Checkpointer) -> Optional[dict[str, Any]]:
    """Apply ``cfg.init_from`` to a fresh run; on a resume the checkpoint wins and the record
    kept in it is returned (the file may be gone by then)."""
    if cfg.init_from is None:
        return None
    state = ckpt.load()
    if state is not None:
        return dict(state.get("extra", {}).get("init_from") or {"path": cfg.init_from})
    info = apply_init_from(backbone, cfg.init_from)
    if dist.is_main():
        print(f"initialised from {cfg.init_from}", flush=True)
    return info


# --------------------------------------------------------------------------------------------
# Compatibility objectives
# --------------------------------------------------------------------------------------------


def _bct_reference(cfg: BackboneConfig, backbone: nn.Module, mean_set: Any, num_classes: int, rt: Runtime,
                   ckpt: Checkpointer, input_stats: Stats) -> Optional[BCTReference]:
    """W_old' for ``cfg.bct_params``: built from the old model on a fresh run, taken from the
    checkpoint on a resume (so a resume needs neither the old model's forward nor its file)."""
    p = cfg.bct_params
    if p is None:
        return None
    state = ckpt.load()
    extra = {} if state is None else state.get("extra", {})
    if "bct_classifier" in extra:
        rows, record = extra["bct_classifier"], dict(extra["bct"])
    else:
        rows, record = build_bct_reference(Path(p.old_model_path), p.influence_weight, backbone.embedding_dim,
                                           num_classes, mean_set, rt, batch_size=cfg.dataset_params.batch_size,
                                           num_workers=cfg.dataset_params.num_workers,
                                           synthesised_rows=p.synthesised_rows, input_stats=input_stats)
        if dist.is_main():
            print(f"BCT: {rows.shape[0]} old classifier rows ({len(record['synthesised_classes'])} "
                  f"synthesised) from {p.old_model_path}", flush=True)
    return BCTReference(rows.to(rt.device), p.influence_weight, record)


def _previous_versions(cfg: BackboneConfig, probe: torch.Tensor, rt: Runtime,
                       input_stats: Stats) -> Optional[PreviousVersions]:
    """The frozen older models and maps of ``cfg.backward_params`` (needed every step)."""
    p = cfg.backward_params
    if p is None:
        return None
    return load_previous_versions(p.previous_model_paths, p.previous_map_paths, p.weight, probe, rt, input_stats)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_backbone(cfg: BackboneConfig) -> dict:
    """Train (or resume) and write ``cfg.output_model_path``; returns the last epoch's metrics.

    With ``cfg.ssl_params`` the backbone is trained label-free (SimCLR); ``dataset_params.num_classes``
    then only selects the images (those of labels 0..K-1), whose labels serve the k-NN monitor only.
    """
    dp, ssl = cfg.dataset_params, cfg.ssl_params
    check_global_batch(dp.batch_size)  # before the process group starts: torchrun then stops cleanly
    rt = make_runtime(cfg.runtime)
    config_dict = to_dict(cfg)
    info = dataset_info(dp.name, dp.data_root, dp)
    k = dp.num_classes or info.num_classes
    if ssl is None and k > cfg.arch_params.num_classes:
        raise UserError(
            f"the data set has {info.num_classes} classes but arch_params.num_classes="
            f"{cfg.arch_params.num_classes}; set dataset_params.num_classes or widen the classifier"
        )

    def train_split(ds):
        return take_fraction(ds, dp.train_fraction, dp.train_fraction_seed)

    if ssl is None:
        train_set = train_split(build_dataset(dp.name, dp.data_root, "train", augment=True,
                                              num_classes=dp.num_classes, options=dp))
        memory_set = None
    else:
        train_set = train_split(build_two_view_dataset(dp.name, dp.data_root, "train", num_classes=dp.num_classes,
                                                       params=ssl.augmentation))
        # the k-NN monitor's memory bank: the same training images, unaugmented
        memory_set = train_split(build_dataset(dp.name, dp.data_root, "train", augment=False,
                                               num_classes=dp.num_classes, options=dp))
    val_set = build_dataset(dp.name, dp.data_root, "val", augment=False, num_classes=dp.num_classes, options=dp)

    run = open_run_folder(cfg.run_dir, config_dict, output_files=_output_files(cfg), inputs=_input_files(cfg))
    with run:
        seed_everything(cfg.seed)
        backbone = build_backbone(**to_dict(cfg.arch_params))
        stats = (info.mean, info.std)
        expect_inputs(backbone, *stats)  # a timm / torchvision trunk converts them to its own
        model: nn.Module = backbone
        if ssl is not None:
            model = SimCLRModel(backbone, ProjectionHead(backbone.embedding_dim, ssl.projection_hidden_dim,
                                                         ssl.projection_dim))
        init_info = _init_from(cfg, backbone, run.checkpointer)
        mean_set = None if cfg.bct_params is None else train_split(
            build_dataset(dp.name, dp.data_root, "train", augment=False, num_classes=dp.num_classes, options=dp))
        bct = _bct_reference(cfg, backbone, mean_set, k, rt, run.checkpointer, stats)
        previous = _previous_versions(cfg, val_set[0][0][None], rt, stats)
        if previous is not None:
            # B_k is trained with the backbone: one module, so one optimizer and one checkpoint hold both
            model = BackwardAlignedModel(backbone, build_backward_map(backbone.embedding_dim, previous.dims[0]))
        model = rt.prepare_model(model)

        pin = rt.device.type == "cuda"
        loader, sampler = train_loader(train_set, global_batch=dp.batch_size, num_workers=dp.num_workers,
                                       seed=cfg.seed, pin_memory=pin,
                                       collate_fn=None if ssl is None else two_view_collate)
        val = eval_loader(val_set, global_batch=dp.batch_size, num_workers=dp.num_workers, pin_memory=pin)
        meter = LossMeter(rt.device)  # the loss components of the compatibility objectives

        def make_step(net: nn.Module) -> StepFn:
            if bct is not None or previous is not None:
                return compatible_step(net, rt, label_smoothing=cfg.label_smoothing, bct=bct, previous=previous,
                                       meter=meter)
            loss_fn = classification_loss(cfg.label_smoothing) if ssl is None else simclr_loss_fn(ssl.temperature)
            return image_step(net, rt, loss_fn)

        def validate(trained: nn.Module, epoch: int) -> dict[str, float]:
            if ssl is None:
                return evaluate_classification(trained, val, rt, num_classes=k)
            return _knn_monitor(trained.backbone, memory_set, val_set, cfg, rt, epoch)

        extra_state: dict[str, Any] = {} if init_info is None else {"init_from": init_info}
        if bct is not None:
            extra_state.update(bct=bct.record, bct_classifier=bct.classifier.cpu())
        # A SimCLR run checkpoints backbone and head together, so a resume is exact.
        last = fit(Trainer(model=model, batches=_SampledLoader(loader, sampler), make_step=make_step,
                           validate=validate, describe=_epoch_line(cfg.epochs), train_extras=meter.averages,
                           extra_state=extra_state),
                   cfg, run, rt, config_dict)
        if dist.is_main():
            _save_outputs(cfg, model, last, k, info.image_size, train_set, init_info, bct, previous)
        dist.barrier()
    return last


class _SampledLoader:
    """A DataLoader whose sampler sets the epoch (``fct.training.loop.Epochs``)."""

    def __init__(self, loader: Any, sampler: Any) -> None:
        self.loader, self.sampler = loader, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _save_outputs(cfg: BackboneConfig, model: nn.Module, last: dict[str, Any], k: int, image_size: int,
                  train_set: Any, init_info: Optional[dict[str, Any]], bct: Optional[BCTReference],
                  previous: Optional[PreviousVersions]) -> None:
    """Write the model file (and B_k) with a record of how it was trained (rank 0)."""
    dp, ssl = cfg.dataset_params, cfg.ssl_params
    meta: dict[str, Any] = {
        "dataset": dp.name,
        "image_size": image_size,  # what exports and foreign runtimes feed the model
        "trained_classes": k,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "code_version": fct.__version__,
        "final_metrics": {kk: v for kk, v in last.items() if isinstance(v, (int, float))},
    }
    if ssl is not None:
        # trained_classes: the classes whose images were used, without their labels
        ssl_meta = to_dict(ssl)
        ssl_meta["augmentation"] = to_dict(train_set.view_transform.params)  # as resolved
        meta.update(label_free=True, ssl=ssl_meta)
    if init_info is not None:
        meta["init_from"] = init_info
    pretrained = cfg.arch_params.pretrained_path
    if pretrained is not None:
        meta["pretrained"] = {"path": pretrained, "sha256": file_sha256(pretrained)}
    if bct is not None:
        meta["bct"] = bct.record
    if previous is not None:
        meta["backward"] = {**previous.record, "output_map_path": cfg.backward_params.output_map_path}
    # Label-free: only the backbone is kept (its classifier is untrained); the head is dropped.
    # Backward maps: the backbone and B_k go to their own files.
    saved = model.backbone if ssl is not None or previous is not None else model
    save_model_file(cfg.output_model_path, saved, kind="backbone",
                    arch_params=to_dict(cfg.arch_params), meta=json.loads(json.dumps(meta)))
    print(f"model written to {cfg.output_model_path}")
    if previous is not None:
        _save_backward_map(cfg, model.backward_map, previous)


def _output_files(cfg: BackboneConfig) -> dict[str, Optional[str]]:
    """The files a run writes besides its run folder, by config key."""
    bp = cfg.backward_params
    return {"output_model_path": cfg.output_model_path,
            "backward_params.output_map_path": None if bp is None else bp.output_map_path}


def _input_files(cfg: BackboneConfig) -> dict[str, Optional[str]]:
    """The model files a run reads, by config key."""
    files: dict[str, Optional[str]] = {"init_from": cfg.init_from,
                                       "arch_params.pretrained_path": cfg.arch_params.pretrained_path}
    if cfg.bct_params is not None:
        files["bct_params.old_model_path"] = cfg.bct_params.old_model_path
    if cfg.backward_params is not None:
        for key in ("previous_model_paths", "previous_map_paths"):
            for i, path in enumerate(getattr(cfg.backward_params, key)):
                files[f"backward_params.{key}[{i}]"] = path
    return files


def _save_backward_map(cfg: BackboneConfig, backward_map: nn.Module, previous: PreviousVersions) -> None:
    """Write B_k (version k -> k-1) as a 'transformation' model file whose meta names both ends."""
    p = cfg.backward_params
    assert p is not None
    meta = {"backward_map": {
        "from_model_path": cfg.output_model_path, "from_sha256": file_sha256(cfg.output_model_path),
        "to_model_path": p.previous_model_paths[0], "to_sha256": previous.record["previous_model_sha256"][0],
        "previous_map_paths": list(p.previous_map_paths), "weight": p.weight,
    }}
    save_transformation(p.output_map_path, backward_map, backward_map.arch_params(), meta=meta)
    print(f"backward map written to {p.output_map_path}")


def _knn_monitor(backbone: nn.Module, memory_set: Any, val_set: Any, cfg: BackboneConfig, rt: Runtime,
                 epoch: int) -> dict[str, float]:
    """k-NN top-1 (%) of val images against the training images, and leave-one-out top-1 within
    val (cosine); every ``knn_every`` epochs and after the last one, else {}."""
    ssl = cfg.ssl_params
    assert ssl is not None
    if (epoch + 1) % ssl.knn_every != 0 and epoch + 1 != cfg.epochs:
        return {}
    dp = cfg.dataset_params
    m = evaluate_knn(backbone, memory_set, val_set, batch_size=max(1, dp.batch_size // dist.world_size()),
                     num_workers=dp.num_workers, device=rt.device, k=ssl.knn_k,
                     progress=not dist.progress_disabled(rt.params.progress),
                     amp_dtype=rt.amp_dtype, channels_last=rt.channels_last)
    return {"val_knn_top1": m["knn_top1"], "val_loo_top1": m["val_loo_top1"]}


def _epoch_line(epochs: int):
    """The console summary of one epoch (supervised or label-free)."""

    def describe(epoch: int, train: dict[str, float], metrics: dict[str, float]) -> str:
        head = f"epoch {epoch + 1}/{epochs}  loss {train['train_loss']:.4f}  "
        tail = f"  {train['images_per_s']:.0f} img/s"
        if "val_top1" in metrics:
            return head + f"val top-1 {metrics['val_top1']:.2f}  top-5 {metrics['val_top5']:.2f}" + tail
        if "val_knn_top1" in metrics:
            return (head + f"val k-NN top-1 {metrics['val_knn_top1']:.2f}  LOO top-1 "
                    f"{metrics['val_loo_top1']:.2f}" + tail)
        return head + "(no k-NN this epoch)" + tail

    return describe
