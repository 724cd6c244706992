"""The kinds of step a recipe is made of, one config file each: train a backbone, train a
transformation, evaluate a case, sweep a weight interpolation, score a compatibility matrix.

Each kind is registered in ``STEP_KINDS`` as a function that loads and checks its config and hands
back how to run it, so every config of a recipe is checked before its first step starts, and an
unknown kind fails loudly (listing the valid ones). Steps hand each other model and features files:
the ``.pt`` / ``.npz`` paths of a config are what it reads, except those of fields named ``output_*``,
which it writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from fct.registry import Registry


@dataclass(frozen=True)
class Step:
    """One config file of a recipe: ``kind`` names its entry in ``STEP_KINDS``; ``name`` (unique in
    the recipe, no spaces) is what ``--only`` and ``--set NAME.KEY=VALUE`` use; ``overrides`` are
    the recipe's own ``--set`` strings for this step."""

    kind: str
    name: str
    config: Path
    overrides: tuple[str, ...] = ()


# The features already computed, shared by the evaluation steps of one run (a model embedded once).
Cache = dict[str, Any]


@dataclass(frozen=True)
class Prepared:
    """A step with its config loaded: ``run`` does the work and returns the step's result (the
    evaluation, sweep or matrix JSON dict), or None for a training step."""

    config: Any
    run: Callable[[Cache], Optional[dict]]


StepKind = Callable[[Path, list[str]], Prepared]
STEP_KINDS: Registry[StepKind] = Registry("step kind")


@STEP_KINDS.register("backbone")
def backbone(path: Path, sets: list[str]) -> Prepared:
    from fct.config import BackboneConfig, load_config
    from fct.training.backbone import train_backbone

    cfg = load_config(BackboneConfig, path, sets)
    return Prepared(cfg, lambda cache: train_backbone(cfg))


@STEP_KINDS.register("transformation")
def transformation(path: Path, sets: list[str]) -> Prepared:
    from fct.config import load_config
    from fct.config.transformation import TransformationConfig
    from fct.training.transformation import train_transformation

    cfg = load_config(TransformationConfig, path, sets)
    return Prepared(cfg, lambda cache: train_transformation(cfg))


@STEP_KINDS.register("eval")
def evaluation(path: Path, sets: list[str]) -> Prepared:
    """Quiet (the recipe prints its own table); the features stay in the run's cache for the
    next cases."""
    from fct.config import EvalConfig, load_config
    from fct.evaluate import evaluate

    cfg = load_config(EvalConfig, path, ["eval_params.verbose=false", *sets])
    return Prepared(cfg, lambda cache: evaluate(cfg, cache=cache))


@STEP_KINDS.register("interpolate")
def interpolate(path: Path, sets: list[str]) -> Prepared:
    from fct.config import load_config
    from fct.config.interpolation import InterpolationConfig
    from fct.regression.sweep import run_sweep

    cfg = load_config(InterpolationConfig, path, sets)
    return Prepared(cfg, lambda cache: run_sweep(cfg))


@STEP_KINDS.register("compat")
def compat(path: Path, sets: list[str]) -> Prepared:
    from fct.compat.chain import evaluate_chain
    from fct.config import load_config
    from fct.config.chain import ChainConfig

    cfg = load_config(ChainConfig, path, sets)
    return Prepared(cfg, lambda cache: evaluate_chain(cfg))


@STEP_KINDS.register("embed")
def embedding(path: Path, sets: list[str]) -> Prepared:
    """A features file of one split under one model (``python -m fct.embed``)."""
    from fct.config import load_config
    from fct.config.embed import EmbedConfig
    from fct.embed import embed

    cfg = load_config(EmbedConfig, path, sets)
    return Prepared(cfg, lambda cache: embed(cfg))


@STEP_KINDS.register("wrap")
def wrapping(path: Path, sets: list[str]) -> Prepared:
    """A pretrained timm / torchvision model as an fct model file (``python -m fct.models.wrap``):
    the config's ``arch_params`` and ``output_model_path``."""
    from fct.config import load_config
    from fct.config.loader import to_dict
    from fct.config.wrap import WrapConfig
    from fct.models.wrap import wrap

    cfg = load_config(WrapConfig, path, sets)

    def run(cache: Cache) -> None:
        wrap(to_dict(cfg.arch_params), cfg.output_model_path)

    return Prepared(cfg, run)


@STEP_KINDS.register("probe")
def probing(path: Path, sets: list[str]) -> Prepared:
    """A model file whose classifier is fitted on stored embeddings (``python -m fct.models.probe``)."""
    from fct.config import load_config
    from fct.config.probe import ProbeConfig
    from fct.models.probe import probe, summary_line

    cfg = load_config(ProbeConfig, path, sets)

    def run(cache: Cache) -> None:
        print(f"{cfg.output_model_path}: {summary_line(probe(cfg))}")

    return Prepared(cfg, run)


def model_files(config: Any) -> tuple[set[str], set[str]]:
    """(read, written): the normalised ``.pt`` / ``.npz`` paths of a loaded config (model and
    features files); written are those of
    fields named ``output_*``, read every other one."""
    from fct.config.loader import to_dict

    read: set[str] = set()
    written: set[str] = set()
    for key, value in _strings(to_dict(config)):
        if value.endswith((".pt", ".npz")):
            (written if key.startswith("output_") else read).add(os.path.normpath(value))
    return read, written


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(field name, value) of every string in a config tree; a list's items carry its name."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node
