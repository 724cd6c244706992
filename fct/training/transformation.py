"""``train_transformation.py``: learn h(old, side) -> new with the old, new and side models frozen,
or from the embeddings those models stored (features files), without running any model.

Both ways feed one loop (``fit``) with the same batches: ({'old', 'new'[, 'side']}: (B, D), labels (B,)).
Stored embeddings become a one-view feature cache, so they are shuffled per epoch exactly as cached
model features are (``CachedBatches``: DistributedSampler(seed).set_epoch(epoch)).
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

import torch
from torch import nn

import fct
from fct import dist
from fct.config.loader import to_dict
from fct.config.transformation import ROLE_KEYS, TransformationConfig
from fct.data import build_dataset, dataset_info
from fct.data.datasets import take_fraction
from fct.errors import ConfigError, UserError
from fct.models import load_model_file, save_transformation, save_transformed_old_model, unwrap_model
from fct.retrieval.embeddings import FeatureFile, pair_feature_files, read_feature_file
from fct.runtime import Runtime, make_runtime, seed_everything
from fct.training.feature_cache import (CachedBatches, build_feature_cache, embed_batch, file_digest,
                                        stored_feature_cache)
from fct.training.loaders import check_global_batch, eval_loader, train_loader
from fct.training.loop import StepFn, Trainer, fit
from fct.training.run_folder import open_run_folder
from fct.transformations import build_transformation
from fct.transformations.losses import transformation_loss

Features = dict[str, torch.Tensor]  # 'old', 'new' and optionally 'side': (B, D) each


def load_frozen(path: str, rt: Runtime, example_input: Optional[torch.Tensor] = None,
                input_stats: Optional[tuple[Sequence[float], Sequence[float]]] = None) -> nn.Module:
    """A frozen model in eval mode; a foreign (TorchScript) model is first tried on ``example_input``;
    ``input_stats``: the data set's (mean, std), which timm / torchvision backbones convert from."""
    model = rt.prepare_model(load_model_file(path, map_location="cpu", example_input=example_input,
                                             input_stats=input_stats)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_dims(cfg: TransformationConfig, dims: dict[str, int], paths: dict[str, Optional[str]]) -> None:
    """Each role's embedding width (``dims``, from the file in ``paths``) against arch_params."""
    ap = cfg.arch_params
    expected = {"old": ap.old_embedding_dim, "new": ap.new_embedding_dim}
    if "side" in dims:
        expected["side"] = ap.side_info_dim if ap.side_info_dim is not None else dims["side"]
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


@dataclass
class _Data:
    """What h trains and validates on, whichever way it was made."""

    batches: Any  # Epochs of (Features, labels (B,))
    val: Any  # this process's validation batches, the same shape


def _classifier(model: nn.Module, path: str, cfg: TransformationConfig) -> Optional[nn.Module]:
    """The new model's classifier; refused when the discriminative loss needs one it lacks."""
    classifier = getattr(unwrap_model(model), "classifier", None)
    if cfg.objective_params.discriminative_loss is None:
        return classifier
    if classifier is None:
        raise ConfigError(
            f"objective_params.discriminative_loss needs the new model's classifier, but {path} "
            "has none (a feature-only model)"
        )
    weight = getattr(classifier, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] != cfg.arch_params.new_embedding_dim:
        raise UserError(f"{path}'s classifier takes {weight.shape[1]}-d embeddings but "
                        f"arch_params.new_embedding_dim={cfg.arch_params.new_embedding_dim}")
    return classifier


def read_stored_embeddings(cfg: TransformationConfig) -> dict[str, dict[str, FeatureFile]]:
    """split ('train', 'val') -> role -> its features file, rows paired across the roles (by ids
    or position). Any mismatch is a UserError naming both files."""
    roles = ["old", "new"] + (["side"] if cfg.side_info_features_path is not None else [])
    out = {}
    for split, column in (("train", 1), ("val", 2)):
        files = pair_feature_files([read_feature_file(getattr(cfg, ROLE_KEYS[r][column])) for r in roles])
        out[split] = dict(zip(roles, files))
    return out


def _stored_val(files: dict[str, FeatureFile], batch_size: int, device: torch.device) -> list:
    """This process's shard of the stored validation embeddings, in batches of ``batch_size``."""
    n = len(files["old"].labels)
    mine = np.arange(dist.rank(), n, dist.world_size())
    feats = {k: torch.from_numpy(f.features[mine].astype(np.float32)).to(device) for k, f in files.items()}
    labels = torch.from_numpy(files["old"].labels[mine].astype(np.int64)).to(device)
    return [({k: v[i: i + batch_size] for k, v in feats.items()}, labels[i: i + batch_size])
            for i in range(0, len(mine), batch_size)]


def _stored_data(cfg: TransformationConfig, stored: dict[str, dict[str, FeatureFile]], rt: Runtime) -> _Data:
    for split, column in (("train", 1), ("val", 2)):
        _check_dims(cfg, {k: f.features.shape[1] for k, f in stored[split].items()},
                    {r: getattr(cfg, ROLE_KEYS[r][column]) for r in ROLE_KEYS})
    per_process = cfg.dataset_params.batch_size // dist.world_size()
    train = stored["train"]
    cache = stored_feature_cache({k: f.features for k, f in train.items()}, train["old"].labels,
                                 {k: f.path for k, f in train.items()})
    if dist.is_main():
        print(f"training on stored embeddings ({len(cache.labels)} rows) from {cache.describe()}")
    return _Data(CachedBatches(cache, batch_size=per_process, seed=cfg.seed, device=rt.device),
                 _stored_val(stored["val"], max(1, per_process), rt.device))


def _model_data(cfg: TransformationConfig, models: dict[str, nn.Module], train_set: Any, val_set: Any,
                rt: Runtime) -> _Data:
    dp = cfg.dataset_params
    val = _ValBatches(val_set, models, rt, dp.batch_size, dp.num_workers)
    _check_dims(cfg, {k: v.shape[1] for k, v in val.batches[0][0].items()},
                {r: getattr(cfg, ROLE_KEYS[r][0]) for r in ROLE_KEYS})
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
        if dist.is_main():
            print(f"training on cached features ({cache.views} views) in {cache.describe()}")
        return _Data(CachedBatches(cache, batch_size=per_process, seed=cfg.seed, device=rt.device), val)
    loader, sampler = train_loader(train_set, global_batch=dp.batch_size, num_workers=dp.num_workers,
                                   seed=cfg.seed, pin_memory=rt.device.type == "cuda")
    return _Data(OnTheFly(loader, sampler, models, rt), val)


def train_transformation(cfg: TransformationConfig) -> dict:
    """Train (or resume) h; write the transformation and, given an old model file, the transformed old model."""
    check_global_batch(cfg.dataset_params.batch_size)  # before the process group starts
    rt = make_runtime(cfg.runtime)
    config_dict = to_dict(cfg)
    dp = cfg.dataset_params
    new_classifier: Optional[nn.Module] = None
    if cfg.from_stored_embeddings:
        stored = read_stored_embeddings(cfg)  # every file read and paired before the run folder is touched
        if cfg.new_model_path is not None:  # not run: only its classifier is used
            new_classifier = _classifier(load_frozen(cfg.new_model_path, rt), cfg.new_model_path, cfg)

        def make_data() -> _Data:
            return _stored_data(cfg, stored, rt)
    else:
        assert cfg.old_model_path is not None and cfg.new_model_path is not None  # checked by the config
        train_set = take_fraction(build_dataset(dp.name, dp.data_root, "train", augment=True,
                                                num_classes=dp.num_classes, options=dp),
                                  dp.train_fraction, dp.train_fraction_seed)
        val_set = build_dataset(dp.name, dp.data_root, "val", augment=False, num_classes=dp.num_classes, options=dp)
        example = val_set[0][0]
        info = dataset_info(dp.name, dp.data_root, dp)
        stats = (info.mean, info.std)
        models = {"old": load_frozen(cfg.old_model_path, rt, example, stats),
                  "new": load_frozen(cfg.new_model_path, rt, example, stats)}
        if cfg.side_info_model_path:
            models["side"] = load_frozen(cfg.side_info_model_path, rt, example, stats)
        new_classifier = _classifier(models["new"], cfg.new_model_path, cfg)

        def make_data() -> _Data:
            return _model_data(cfg, models, train_set, val_set, rt)

    cache_dir = cfg.feature_cache.dir if cfg.feature_cache.enabled and not cfg.from_stored_embeddings else None
    run = open_run_folder(cfg.run_dir, config_dict, output_files=_output_files(cfg), inputs=_input_files(cfg),
                          output_folders={"feature_cache.dir": cache_dir})
    with run:
        seed_everything(cfg.seed)
        h = rt.prepare_model(build_transformation(**to_dict(cfg.arch_params)))
        h.to(memory_format=torch.contiguous_format)
        data = make_data()

        def before_epoch(net: nn.Module, epoch: int) -> None:
            if cfg.switch_mode_to_eval and epoch >= cfg.epochs // 2:
                set_bn_eval(net)

        def describe(epoch: int, train: dict[str, float], metrics: dict[str, float]) -> str:
            return (f"epoch {epoch + 1}/{cfg.epochs}  loss {train['train_loss']:.4f}  val loss "
                    f"{metrics['val_loss']:.4f}  val cos {metrics['val_cosine']:.3f}  "
                    f"{train['images_per_s']:.0f} samples/s")

        last = fit(Trainer(model=h, batches=data.batches,
                           make_step=lambda net: feature_step(net, new_classifier, cfg),
                           validate=lambda trained, epoch: validate(trained, data.val, new_classifier, cfg, rt),
                           describe=describe, before_epoch=before_epoch),
                   cfg, run, rt, config_dict)
        if dist.is_main():
            _write_outputs(cfg, h.eval(), last)
        dist.barrier()
    return last


def _write_outputs(cfg: TransformationConfig, h: nn.Module, last: dict) -> None:
    arch = to_dict(cfg.arch_params)
    meta = {"epochs": cfg.epochs, "seed": cfg.seed, "code_version": fct.__version__,
            **{key: getattr(cfg, key) for keys in ROLE_KEYS.values() for key in keys},
            "final_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))}}
    save_transformation(cfg.output_transformation_path, h.cpu(), arch, meta)
    if cfg.old_model_path is None:
        print(f"transformation written to {cfg.output_transformation_path}; only h is written (trained on stored "
              "embeddings without old_model_path, there is no transformed old model: evaluate h on stored "
              "embeddings with eval.py's gallery_transformation_path)")
        return
    assert cfg.output_transformed_old_model_path is not None  # checked by the config
    save_transformed_old_model(cfg.output_transformed_old_model_path, cfg.old_model_path,
                               cfg.side_info_model_path, h.cpu(), arch)
    print(f"transformation written to {cfg.output_transformation_path}; transformed old model to "
          f"{cfg.output_transformed_old_model_path}")


def _output_files(cfg: TransformationConfig) -> dict[str, Optional[str]]:
    return {"output_transformation_path": cfg.output_transformation_path,
            "output_transformed_old_model_path": cfg.output_transformed_old_model_path}


def _input_files(cfg: TransformationConfig) -> dict[str, Optional[str]]:
    return {key: getattr(cfg, key) for keys in ROLE_KEYS.values() for key in keys}
