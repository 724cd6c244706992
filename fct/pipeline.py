"""A pipeline of config files run in order (backbones, transformations, evaluations), as used by
``make quickstart`` and ``make reproduce-cpu``. Every step is resumable through its own run folder,
so rerunning a pipeline redoes only unfinished work; each step's wall time is recorded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fct.io import atomic_write_json


@dataclass(frozen=True)
class Step:
    """One config: kind 'backbone' | 'transformation' | 'interpolate' | 'compat' | 'eval'; ``name`` labels it."""

    kind: str
    name: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass
class PipelineResult:
    results: dict[str, dict] = field(default_factory=dict)  # eval/interpolate step name -> its result
    seconds: dict[str, float] = field(default_factory=dict)  # step name -> wall seconds


def run_steps(steps: Sequence[Step], overrides: dict[str, Sequence[str]] | None = None) -> PipelineResult:
    """Run the steps in order; ``overrides[kind]`` are ``--set`` strings added to every step of
    that kind (e.g. a data root, or fewer epochs for a smoke run)."""
    from fct.config import BackboneConfig, EvalConfig, load_config
    from fct.config.transformation import TransformationConfig
    from fct.evaluate import evaluate
    from fct.training.backbone import train_backbone
    from fct.training.transformation import train_transformation

    overrides = overrides or {}
    out = PipelineResult()
    cache: dict = {}
    for step in steps:
        sets = [*overrides.get(step.kind, ()), *step.overrides]
        t0 = time.perf_counter()
        if step.kind == "backbone":
            print(f"== training {step.name}", flush=True)
            train_backbone(load_config(BackboneConfig, step.config, sets))
        elif step.kind == "transformation":
            print(f"== training {step.name}", flush=True)
            train_transformation(load_config(TransformationConfig, step.config, sets))
        elif step.kind == "interpolate":
            from fct.config.interpolation import InterpolationConfig
            from fct.regression.sweep import run_sweep

            print(f"== {step.name}", flush=True)
            out.results[step.name] = run_sweep(load_config(InterpolationConfig, step.config, sets))
        elif step.kind == "compat":
            from fct.compat.chain import evaluate_chain
            from fct.config.chain import ChainConfig

            print(f"== {step.name}", flush=True)
            out.results[step.name] = evaluate_chain(load_config(ChainConfig, step.config, sets))
        elif step.kind == "eval":
            cfg = load_config(EvalConfig, step.config, ["eval_params.verbose=false", *sets])
            out.results[step.name] = evaluate(cfg, cache=cache)
        else:
            raise ValueError(f"unknown step kind {step.kind!r}")
        out.seconds[step.name] = round(time.perf_counter() - t0, 1)
    return out


def backfilling_summary(results: dict[str, dict], aucs: Sequence[tuple[str, str, str]], plot_path: Path,
                        title: str) -> dict[str, dict[str, float]]:
    """AUC rows ``(row label, eval step name, ordering)`` -> {row: {metric: AUC (mean of points)}}, and one
    plot of those curves (mean over runs) side by side."""
    from fct.plots import plot_backfilling
    from fct.retrieval.backfilling import BackfillCurve

    rows: dict[str, dict[str, float]] = {}
    curves = {}
    for label, name, order in aucs:
        entry: dict[str, Any] = results[name]["backfilling"]["orderings"][order]
        metrics = [m for m in ("top1", "top5", "mAP") if m in entry]
        rows[label] = {m: entry[m]["auc_mean"] for m in metrics}
        curves[label.replace("backfilling AUC, ", "")] = BackfillCurve(
            label, entry["fractions"], {m: np.array([entry[m]["points"]]) for m in metrics})
    plot_backfilling(curves, plot_path, title=title)
    return rows


def write_summary(summary: dict, path: Path) -> None:
    atomic_write_json(summary, path)


TINY_IMAGENET = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyimagenet100-32"


def tiny_imagenet_override(data_root: str | None) -> str:
    """The ``--set`` that points a Tiny-ImageNet config at ``data_root`` (default: the shared
    stand-in beside the repository); a missing stand-in is a UserError naming the folder."""
    from fct.errors import UserError

    root = Path(data_root) if data_root else TINY_IMAGENET
    if not (root / "train.npz").is_file() or not (root / "val.npz").is_file():
        raise UserError(f"the Tiny-ImageNet stand-in is not at {root} (train.npz, val.npz); give --data-root")
    return f"dataset_params.data_root={root.resolve()}"
