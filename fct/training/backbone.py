"""``train_backbone.py``: train an embedding model with a classifier, resumably, on 1..N processes."""

from __future__ import annotations

import json
import time
import torch
from torch import nn

import fct
from fct import dist
from fct.config.loader import to_dict
from fct.config.schema import BackboneConfig
from fct.data import build_dataset, dataset_info
from fct.errors import UserError
from fct.models import build_backbone, save_model_file, unwrap_model
from fct.optim import build_optimizer, build_schedule
from fct.runtime import Runtime, make_runtime, seed_everything
from fct.training.checkpoint import Checkpointer, write_resolved_config
from fct.training.loaders import eval_loader, train_loader
from fct.training.loop import evaluate_classification, image_step, train_one_epoch
from fct.training.runlog import RunLog

def classification_loss(label_smoothing: float):
    def loss_fn(out, labels: torch.Tensor):
        logits = out.logits
        return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), logits

    return loss_fn


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    if not dist.is_dist():
        return model
    if rt.device.type == "cuda" and rt.params.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def train_backbone(cfg: BackboneConfig) -> dict:
    """Train (or resume) and write ``cfg.output_model_path``; returns the last epoch's metrics."""
    rt = make_runtime(cfg.runtime)
    run_dir = cfg.run_dir
    config_dict = to_dict(cfg)
    info = dataset_info(cfg.dataset_params.name, cfg.dataset_params.data_root)
    k = cfg.dataset_params.num_classes or info.num_classes
    if k > cfg.arch_params.num_classes:
        raise UserError(
            f"the data set has {info.num_classes} classes but arch_params.num_classes="
            f"{cfg.arch_params.num_classes}; set dataset_params.num_classes or widen the classifier"
        )
    train_set = build_dataset(cfg.dataset_params.name, cfg.dataset_params.data_root, "train",
                              augment=True, num_classes=cfg.dataset_params.num_classes)
    val_set = build_dataset(cfg.dataset_params.name, cfg.dataset_params.data_root, "val",
                            augment=False, num_classes=cfg.dataset_params.num_classes)

    write_resolved_config(run_dir, config_dict)

    seed_everything(cfg.seed)
    model = build_backbone(**to_dict(cfg.arch_params))
    model = rt.prepare_model(model)
    optimizer = build_optimizer(model, cfg.optimizer_params)
    scaler = torch.amp.GradScaler("cuda") if rt.uses_scaler else None

    ckpt = Checkpointer(run_dir)
    start, last = ckpt.resume(model, optimizer, scaler, config_dict, cfg.epochs)

    net = wrap_ddp(model, rt)
    if cfg.runtime.compile:
        net = torch.compile(net)
    pin = rt.device.type == "cuda"
    dp = cfg.dataset_params
    loader, sampler = train_loader(train_set, global_batch=dp.batch_size, num_workers=dp.num_workers,
                                   seed=cfg.seed, pin_memory=pin)
    val = eval_loader(val_set, global_batch=dp.batch_size, num_workers=dp.num_workers, pin_memory=pin)
    lr_at = build_schedule(cfg.lr_policy_params, cfg.optimizer_params.lr, cfg.epochs)
    step_fn = image_step(net, rt, classification_loss(cfg.label_smoothing))
    log = RunLog(run_dir, tensorboard=cfg.runtime.tensorboard, resume_epoch=start)
    try:
        for epoch in range(start, cfg.epochs):
            sampler.set_epoch(epoch)
            # The model's own randomness (if any) is also a function of (seed, epoch) only.
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            net.train()
            train = train_one_epoch(step_fn, loader, optimizer, lr_at, epoch, rt, scaler)
            metrics = evaluate_classification(unwrap_model(net), val, rt, num_classes=k)
            last = {"epoch": epoch, **train, **metrics, "time": time.time()}
            ckpt.save(epoch=epoch + 1, model=net, optimizer=optimizer, scaler=scaler, config=config_dict,
                      extra={"last": last})
            log.log_epoch(last)
            if dist.is_main():
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {train['train_loss']:.4f}  "
                    f"val top-1 {metrics['val_top1']:.2f}  top-5 {metrics['val_top5']:.2f}  "
                    f"{train['images_per_s']:.0f} img/s",
                    flush=True,
                )
    finally:
        log.close()
    if dist.is_main():
        meta = {
            "dataset": dp.name,
            "trained_classes": k,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "code_version": fct.__version__,
            "final_metrics": {kk: v for kk, v in last.items() if isinstance(v, (int, float))},
        }
        save_model_file(cfg.output_model_path, unwrap_model(net), kind="backbone",
                        arch_params=to_dict(cfg.arch_params), meta=json.loads(json.dumps(meta)))
        print(f"model written to {cfg.output_model_path}")
    dist.barrier()
    return last
