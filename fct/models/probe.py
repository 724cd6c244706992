"""Fit a backbone model file's classifier on stored embeddings (a linear probe), trunk unchanged.

    python -m fct.models.probe --model new.pt --features new_train.npz [--val-features new_val.npz] \\
        [--label-smoothing 0.1] [--weight-decay 1e-4] [--steps 100] --out new_probed.pt
    python -m fct.models.probe --config probe.yaml [--set KEY=VALUE ...]   # a ProbeConfig

A wrapped pretrained model (``python -m fct.models.wrap``) has an untrained classifier, and a team
that hands over only stored embeddings has none that fits its classes. FastFill's discriminative loss
(``objective_params.discriminative_loss``) needs the new model's classifier for the training labels:
this fits one on the new model's stored embeddings of the training set (``features`` and ``labels``
of an fct features file) and writes a copy of the model file whose ``classifier`` is the fitted one.
The classifier stays what fct's backbones have, a bias-free linear map of the embedding; it is fitted
by full-batch L-BFGS on the label-smoothed cross-entropy plus ``weight_decay * ||W||^2 / 2``, a convex
problem, from zero weights: the result does not depend on a seed. Every other tensor of the file is
copied unchanged. The written file's meta gains ``probe`` (features file and SHA-256, settings,
training and validation accuracy).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from fct.config.probe import ProbeConfig
from fct.errors import UserError


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     label_smoothing: float = 0.1, weight_decay: float = 1e-4, steps: int = 100) -> torch.Tensor:
    """The (num_classes, D) weight W minimising mean CE_ls(x W^T, y) + weight_decay * ||W||^2 / 2
    over the rows x of ``features`` (float64 L-BFGS from zero, strong Wolfe line search)."""
    x = features.double()
    y = labels.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T, y, label_smoothing=label_smoothing) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


def _accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((features.float() @ weight.T).argmax(1).eq(labels).double().mean() * 100.0)


def _embeddings(path: str, flag: str, dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fct.retrieval.embeddings import load_feature_file

    e = load_feature_file(path)
    if e.features.ndim != 2 or e.features.shape[1] != dim:
        raise UserError(f"{flag} {path} holds {tuple(e.features.shape)} features; the model's classifier takes "
                        f"{dim}-d embeddings")
    if len(e.labels) == 0:
        raise UserError(f"{flag} {path} holds no rows")
    if int(e.labels.min()) < 0 or int(e.labels.max()) >= num_classes:
        raise UserError(f"{flag} {path} has labels {int(e.labels.min())}..{int(e.labels.max())}; the model's "
                        f"classifier has {num_classes} rows (labels 0..{num_classes - 1})")
    return e.features, e.labels


# The command line's names of ProbeConfig's files, for its error messages.
FLAGS = {"model_path": "--model", "features_path": "--features", "val_features_path": "--val-features",
         "output_model_path": "--out"}


def probe(cfg: ProbeConfig, names: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Fit the classifier of ``cfg.model_path`` on ``cfg.features_path`` and write the model to
    ``cfg.output_model_path``; returns the ``probe`` record written into its meta. The file is read
    once and written back with only ``classifier.weight`` replaced (the network is not built).
    ``names``: what error messages call the config's files (default: their keys; the CLI: FLAGS)."""
    from fct.io import atomic_torch_save, file_sha256
    from fct.models.model_file import read_model_file
    from fct.outputs import check_outputs

    name = (names or {}).get
    inputs = {name(k, k): getattr(cfg, k) for k in ("model_path", "features_path", "val_features_path")
              if getattr(cfg, k) is not None}
    check_outputs({name("output_model_path", "output_model_path"): cfg.output_model_path}, inputs=inputs)
    model = f"{name('model_path', 'model_path')} {cfg.model_path}"
    raw = read_model_file(cfg.model_path)
    if raw["kind"] != "backbone":
        raise UserError(f"{model} is a {raw['kind']!r} model file; a probe fits a backbone's classifier")
    state = raw["state_dict"]
    current = state.get("classifier.weight")
    if not isinstance(current, torch.Tensor) or current.ndim != 2 or "classifier.bias" in state:
        raise UserError(f"{model} has no bias-free linear classifier to fit")
    num_classes, dim = current.shape
    x, y = _embeddings(cfg.features_path, name("features_path", "features_path"), dim, num_classes)
    weight = fit_linear_probe(x, y, num_classes, label_smoothing=cfg.label_smoothing,
                              weight_decay=cfg.weight_decay, steps=cfg.steps).to(current.dtype)

    def source(path: str, rows: int) -> dict[str, Any]:  # a features folder (fct.embed shards) has no one hash
        return {"path": str(path), "rows": rows, **({"sha256": file_sha256(path)} if os.path.isfile(path) else {})}

    record: dict[str, Any] = {
        "features": source(cfg.features_path, len(y)),
        "label_smoothing": cfg.label_smoothing, "weight_decay": cfg.weight_decay, "steps": cfg.steps,
        "train_top1": round(_accuracy(weight, x, y), 4)}
    if cfg.val_features_path is not None:
        vx, vy = _embeddings(cfg.val_features_path, name("val_features_path", "val_features_path"), dim,
                             num_classes)
        record["val_features"] = source(cfg.val_features_path, len(vy))
        record["val_top1"] = round(_accuracy(weight, vx, vy), 4)
    atomic_torch_save({**raw, "state_dict": {**state, "classifier.weight": weight},
                       "meta": {**raw["meta"], "probe": record}}, cfg.output_model_path)
    return record


def summary_line(record: dict[str, Any]) -> str:
    """What a probe run prints: rows fitted on, training and validation top-1."""
    val = f", validation top-1 {record['val_top1']:.2f}%" if "val_top1" in record else ""
    return (f"classifier fitted on {record['features']['rows']} embeddings (training top-1 "
            f"{record['train_top1']:.2f}%{val})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fct.models.probe", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a probe config (model_path, features_path, output_model_path, ...) "
                   "instead of the flags below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --config key")
    p.add_argument("--model", help="backbone model file whose classifier is fitted")
    p.add_argument("--features", help="the model's stored embeddings of the training set (.npz)")
    p.add_argument("--val-features", help="stored embeddings whose classification accuracy is reported")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty on the weights (default 1e-4)")
    p.add_argument("--steps", type=int, default=100, help="L-BFGS iterations (default 100)")
    p.add_argument("--out", help="the model file to write")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    from fct.config import load_config

    if args.config:
        given = [f for f in ("model", "features", "val_features", "out") if getattr(args, f) is not None]
        if given:
            raise UserError(f"--config gives the files; drop --{given[0].replace('_', '-')} (or use --set)")
        cfg = load_config(ProbeConfig, args.config, args.set)
    else:
        missing = [f for f in ("model", "features", "out") if getattr(args, f) is None]
        if missing or args.set:
            raise UserError(f"give --{missing[0]} (or --config)" if missing else "--set needs --config")
        cfg = ProbeConfig(model_path=args.model, features_path=args.features, output_model_path=args.out,
                          val_features_path=args.val_features, label_smoothing=args.label_smoothing,
                          weight_decay=args.weight_decay, steps=args.steps)
    record = probe(cfg, None if args.config else FLAGS)
    print(f"{cfg.output_model_path}: {summary_line(record)}")
    return record


if __name__ == "__main__":
    from fct.cli import run_main

    sys.exit(run_main(main))
