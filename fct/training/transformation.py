"""``train_transformation.py``: learn h(old, side) -> new with the old, new and side models frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import fct
from fct import dist
from fct.config.loader import to_dict
from fct.config.transformation import TransformationConfig
from fct.data import build_dataset
from fct.data.datasets import take_fraction
from fct.errors import ConfigError, UserError
from fct.models import load_model_file, save_transformation, save_transformed_old_model, unwrap_model
from fct.runtime import Runtime, make_runtime, seed_everything
from fct.training.feature_cache import CachedBatches, build_feature_cache, embed_batch, file_digest
from fct.training.loaders import check_global_batch, eval_loader, train_loader
from fct.training.loop import StepFn, Trainer, fit
from fct.training.run_folder import open_run_folder
from fct.transformations import build_transformation
from fct.transformations.losses import transformation_loss

Features = dict[str, torch.Tensor]  # 'old', 'new' and optionally 'side': (B, D) each


def load_frozen(path: str, rt: Runtime, example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """A frozen model in eval mode; a foreign (TorchScript) model is first tried on ``example_input``."""
    model = rt.prepare_model(load_model_file(path, map_location="cpu", example_input=example_input)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_dims(cfg: TransformationConfig, dims: dict[str, int]) -> None:
    ap = cfg.arch_params
    expected = {"old": ap.old_embedding_dim, "new": ap.new_embedding_dim}
    if "side" in dims:
        expected["side"] = ap.side_info_dim if ap.side_info_dim is not None else dims["side"]
    paths = {"old": cfg.old_model_path, "new": cfg.new_model_path, "side": cfg.side_info_model_path}
    keys = {"old": "old_embedding_dim", "new": "new_embedding_dim", "side": "side_info_dim"}
    for name, want in expected.items():
        if dims[name] != want:
            raise UserError(
                f"{paths[name]} gives {dims[name]}-d embeddings but arch_params.{keys[name]}={want}"
            )


def feature_step(h: nn.Module, new_classifier: Optional[nn.Module], cfg: TransformationConfig) -> StepFn:
    """StepFn for batches of (features, labels)."""

    def step(batch: tuple[Features, torch.Tensor]):
        feats, labels = batch
        out = h(feats["old"], feats.get("side"))
        loss, _logs = transformation_loss(out, feats["new"], labels, new_classifier, cfg.objective_params)
        return loss, None, labels

    return step


class OnTheFly:
    """Image batches turned into frozen-model features as they are loaded (no cache)."""

    def __init__(self, loader: Any, sampler: Any, models: dict[str, nn.Module], rt: Runtime) -> None:
        self.loader, self.sampler, self.models, self.rt = loader, sampler, models, rt

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield embed_batch(self.models, images, self.rt), labels.to(self.rt.device, non_blocking=True)


def set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.inference_mode()
def validate(h: nn.Module, batches: Any, new_classifier: Optional[nn.Module], cfg: TransformationConfig,
             rt: Runtime) -> dict[str, float]:
    """Mean objective and similarity on the validation split (h in eval mode)."""
    h.eval()
    total = torch.zeros(3, device=rt.device, dtype=torch.float64)
    for feats, labels in batches:
        with rt.autocast():
            out = h(feats["old"], feats.get("side"))
            loss, _ = transformation_loss(out, feats["new"], labels, new_classifier, cfg.objective_params)
        cos = nn.functional.cosine_similarity(out.feature.float(), feats["new"].float(), dim=1).sum()
        n = labels.shape[0]
        total += torch.stack([loss.double() * n, cos.double(), torch.tensor(float(n), device=rt.device,
                                                                             dtype=torch.float64)])
    total = dist.all_reduce_sum(total)
    n = max(total[2].item(), 1.0)
    return {"val_loss": total[0].item() / n, "val_cosine": total[1].item() / n}


class _ValBatches:
    """Validation features, computed once (no augmentation) and kept in memory."""

    def __init__(self, dataset: Any, models: dict[str, nn.Module], rt: Runtime, batch: int, workers: int) -> None:
        loader = eval_loader(dataset, global_batch=batch, num_workers=workers, pin_memory=False)
        self.batches = [(embed_batch(models, x, rt), y.to(rt.device)) for x, y in loader]

    def __iter__(self):
        return iter(self.batches)


def train_transformation(cfg: TransformationConfig) -> dict:
    """Train (or resume) h; write the transformation and the transformed old model."""
    check_global_batch(cfg.dataset_params.batch_size)  # before the process group starts
    rt = make_runtime(cfg.runtime)
    config_dict = to_dict(cfg)
    dp = cfg.dataset_params
    train_set = take_fraction(build_dataset(dp.name, dp.data_root, "train", augment=True, num_classes=dp.num_classes),
                              dp.train_fraction, dp.train_fraction_seed)
    val_set = build_dataset(dp.name, dp.data_root, "val", augment=False, num_classes=dp.num_classes)
    example = val_set[0][0]
    models = {"old": load_frozen(cfg.old_model_path, rt, example), "new": load_frozen(cfg.new_model_path, rt, example)}
    if cfg.side_info_model_path:
        models["side"] = load_frozen(cfg.side_info_model_path, rt, example)
    new_classifier = getattr(unwrap_model(models["new"]), "classifier", None)
    if cfg.objective_params.discriminative_loss is not None and new_classifier is None:
        raise ConfigError(
            f"objective_params.discriminative_loss needs the new model's classifier, but {cfg.new_model_path} "
            "has none (a feature-only model)"
        )

    run = open_run_folder(cfg.run_dir, config_dict, output_files=_output_files(cfg), inputs=_input_files(cfg),
                          output_folders={"feature_cache.dir": cfg.feature_cache.dir if cfg.feature_cache.enabled
                                          else None})
    with run:
        seed_everything(cfg.seed)
        h = rt.prepare_model(build_transformation(**to_dict(cfg.arch_params)))
        h.to(memory_format=torch.contiguous_format)
        val = _ValBatches(val_set, models, rt, dp.batch_size, dp.num_workers)
        _check_dims(cfg, {k: v.shape[1] for k, v in val.batches[0][0].items()})

        per_process = dp.batch_size // dist.world_size()
        if cfg.feature_cache.enabled:
            key = {
                "models": {k: file_digest(p) for k, p in (("old", cfg.old_model_path), ("new", cfg.new_model_path),
                                                           ("side", cfg.side_info_model_path)) if p},
                "data": [dp.name, str(Path(dp.data_root).resolve()) if dp.data_root else "", dp.num_classes]
                + ([dp.train_fraction, dp.train_fraction_seed] if dp.train_fraction is not None else []),
                "code": fct.__version__,
            }
            cache = build_feature_cache(models, train_set, views=cfg.feature_cache.views, seed=cfg.seed,
                                        cache_dir=cfg.feature_cache.dir, key=key, rt=rt,
                                        batch_size=per_process, num_workers=dp.num_workers)
            batches: Any = CachedBatches(cache, batch_size=per_process, seed=cfg.seed, device=rt.device)
            if dist.is_main():
                print(f"training on cached features ({cache.views} views) in {cache.describe()}")
        else:
            loader, sampler = train_loader(train_set, global_batch=dp.batch_size, num_workers=dp.num_workers,
                                           seed=cfg.seed, pin_memory=rt.device.type == "cuda")
            batches = OnTheFly(loader, sampler, models, rt)

        def before_epoch(net: nn.Module, epoch: int) -> None:
            if cfg.switch_mode_to_eval and epoch >= cfg.epochs // 2:
                set_bn_eval(net)

        def describe(epoch: int, train: dict[str, float], metrics: dict[str, float]) -> str:
            return (f"epoch {epoch + 1}/{cfg.epochs}  loss {train['train_loss']:.4f}  val loss "
                    f"{metrics['val_loss']:.4f}  val cos {metrics['val_cosine']:.3f}  "
                    f"{train['images_per_s']:.0f} samples/s")

        last = fit(Trainer(model=h, batches=batches, make_step=lambda net: feature_step(net, new_classifier, cfg),
                           validate=lambda trained, epoch: validate(trained, val, new_classifier, cfg, rt),
                           describe=describe, before_epoch=before_epoch),
                   cfg, run, rt, config_dict)
        if dist.is_main():
            hh = h.eval()
            arch = to_dict(cfg.arch_params)
            meta = {"epochs": cfg.epochs, "seed": cfg.seed, "code_version": fct.__version__,
                    "old_model_path": cfg.old_model_path, "new_model_path": cfg.new_model_path,
                    "side_info_model_path": cfg.side_info_model_path,
                    "final_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))}}
            save_transformation(cfg.output_transformation_path, hh.cpu(), arch, meta)
            save_transformed_old_model(cfg.output_transformed_old_model_path, cfg.old_model_path,
                                       cfg.side_info_model_path, hh.cpu(), arch)
            print(f"transformation written to {cfg.output_transformation_path}; transformed old model to "
                  f"{cfg.output_transformed_old_model_path}")
        dist.barrier()
    return last


def _output_files(cfg: TransformationConfig) -> dict[str, Optional[str]]:
    return {"output_transformation_path": cfg.output_transformation_path,
            "output_transformed_old_model_path": cfg.output_transformed_old_model_path}


def _input_files(cfg: TransformationConfig) -> dict[str, Optional[str]]:
    return {"old_model_path": cfg.old_model_path, "new_model_path": cfg.new_model_path,
            "side_info_model_path": cfg.side_info_model_path}
