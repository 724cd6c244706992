"""What a recipe is and how every recipe runs: its steps in order (each resumable through its own
run folder, so a rerun redoes only unfinished work), the ``--only`` / ``--set`` / ``--quick`` /
``--data-root`` options, and one summary with the same keys for every recipe
(``<out>/<stem>.json``, written atomically, and the same tables in ``<out>/<stem>.md``)."""

from __future__ import annotations

import fnmatch
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from fct.errors import UserError
from fct.experiments.steps import STEP_KINDS, Cache, Prepared, Step, model_files
from fct.registry import Registry

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# The Tiny-ImageNet stand-in (train.npz, val.npz) beside the repository: the default of --data-root.
TINY_IMAGENET = REPO.parent / "shared" / "data" / "tinyimagenet100-32"


@dataclass(frozen=True)
class Digest:
    """A recipe's reading of its step results: ``results`` goes into the summary JSON under
    ``results``, ``text`` (its tables) to the console and the summary's markdown."""

    results: dict[str, Any]
    text: str


@dataclass(frozen=True)
class Recipe:
    """A study run as steps in order.

    ``quick`` maps a step kind to the ``--set`` strings of the smoke run (``--quick``); ``steps``
    takes whether the run is quick (a recipe may shrink single steps too); ``summarise`` gets the
    results of the steps that ran (a partial run with ``--only`` has some only) and digests those
    it can. ``out`` is relative to the working directory, like the paths in the configs."""

    about: str  # one line, for --help
    out: Path
    steps: Callable[[bool], list[Step]]
    summarise: Callable[[dict[str, dict]], Digest]
    quick: Mapping[str, Sequence[str]] = field(default_factory=dict)
    tiny_imagenet: bool = False  # the data is the stand-in (--data-root) rather than embedded
    summary_stem: str = "summary"  # <out>/<stem>.json and .md


# Recipe name -> a function that builds it; each recipe module registers its own.
RECIPES: Registry[Callable[[], Recipe]] = Registry("recipe")


@dataclass(frozen=True)
class Options:
    """The command line shared by every recipe. ``sets``: ``KEY=VALUE`` (every backbone step),
    ``KIND.KEY=VALUE`` (every step of that kind) or ``STEP.KEY=VALUE`` (one step). ``only``: step
    names or shell patterns; empty runs every step."""

    data_root: Optional[Path] = None
    sets: tuple[str, ...] = ()
    quick: bool = False
    only: tuple[str, ...] = ()


def tiny_imagenet_override(data_root: Optional[Path]) -> str:
    """The ``--set`` that points a Tiny-ImageNet config at ``data_root`` (default the stand-in beside
    the repository); a missing stand-in is a UserError naming the folder."""
    root = data_root or TINY_IMAGENET
    if not (root / "train.npz").is_file() or not (root / "val.npz").is_file():
        raise UserError(f"the Tiny-ImageNet stand-in is not at {root} (train.npz, val.npz); give --data-root")
    return f"dataset_params.data_root={root.resolve()}"


def names_data(config: Path) -> bool:
    """Whether a config file has a ``dataset_params`` section (the ``--data-root`` override points
    it at the data; a config that reads only model or features files has none to point)."""
    from fct.config import load_yaml

    return "dataset_params" in load_yaml(config)


def select(steps: Sequence[Step], only: Sequence[str]) -> list[Step]:
    """The steps named by ``only`` (names or shell patterns such as ``'eval-*'``), in recipe order;
    a name that matches no step is a UserError listing the valid ones."""
    if not only:
        return list(steps)
    names = [s.name for s in steps]
    unknown = [p for p in only if not fnmatch.filter(names, p)]
    if unknown:
        raise UserError(f"--only: no step {', '.join(map(repr, unknown))} in this recipe; its steps, "
                        f"in order: {', '.join(names)}")
    return [s for s in steps if any(fnmatch.fnmatchcase(s.name, p) for p in only)]


def _scope(s: str) -> tuple[str, str]:
    """``'SCOPE.KEY=VALUE'`` -> ``('SCOPE', 'KEY=VALUE')``; ``'KEY=VALUE'`` -> ``('', 'KEY=VALUE')``.
    Whether SCOPE is a step or a kind, or just the first part of a dotted config key, is the
    caller's to decide."""
    head, dot, _ = s.partition("=")[0].partition(".")
    return (head, s[len(head) + 1:]) if dot else ("", s)


def step_sets(step: Step, sets: Sequence[str], names: set[str]) -> tuple[list[str], list[str]]:
    """The user's ``--set`` strings for ``step``: (before the recipe's own overrides of the step,
    after them). Unscoped ones go to backbone steps, as they always have; a ``STEP.`` scope wins
    over the recipe's step overrides (e.g. the seed of a second fine-tuned model)."""
    before: list[str] = []
    after: list[str] = []
    for s in sets:
        scope, value = _scope(s)
        if scope in names:
            if scope == step.name:
                after.append(value)
        elif scope in STEP_KINDS:
            if scope == step.kind:
                before.append(value)
        elif step.kind == "backbone":
            before.append(s)
    return before, after


def missing_inputs(steps: Sequence[Step], prepared: Mapping[str, Prepared], run: Sequence[Step]) -> list[str]:
    """For each step of ``run`` (in order), the model files it reads that another step of the recipe
    makes, when that step does not run before it and the file is not there yet."""
    maker = {path: s.name for s in steps for path in model_files(prepared[s.name].config)[1]}
    problems: list[str] = []
    done: set[str] = set()
    for s in run:
        for path in sorted(model_files(prepared[s.name].config)[0]):
            by = maker.get(path)
            if by is not None and by not in done and not os.path.exists(path):
                problems.append(f"step {s.name!r} needs {path}, made by step {by!r}, which has not run yet")
        done.add(s.name)
    return problems


@dataclass(frozen=True)
class Plan:
    """A recipe's steps in order with their configs loaded (options applied), and the data root
    the Tiny-ImageNet configs were pointed at."""

    steps: list[Step]
    prepared: dict[str, Prepared]
    data_root: Optional[str]


def plan(recipe: Recipe, opts: Options) -> Plan:
    """Load every step's config with its ``--set`` strings, in this order: the data root, the
    quick run's, the user's unscoped and kind-scoped ones, the recipe's own for the step, the
    user's step-scoped ones. Every config is checked before the first step starts; an unknown
    step kind is a ConfigError naming the valid ones."""
    if recipe.tiny_imagenet:
        data_sets = [tiny_imagenet_override(opts.data_root)]
    elif opts.data_root is not None:
        raise UserError("--data-root is for the Tiny-ImageNet recipes; this one uses an embedded data set")
    else:
        data_sets = []
    steps = recipe.steps(opts.quick)
    names = {s.name for s in steps}
    kinds = {s.kind for s in steps}
    unused = sorted({k for k, _ in map(_scope, opts.sets) if k in STEP_KINDS and k not in kinds})
    if unused:
        raise UserError(f"--set: this recipe has no {' or '.join(unused)} step")
    prepared: dict[str, Prepared] = {}
    for s in steps:
        before, after = step_sets(s, opts.sets, names)
        quick = list(recipe.quick.get(s.kind, ())) if opts.quick else []
        sets = [*(data_sets if names_data(s.config) else []), *quick, *before, *s.overrides, *after]
        prepared[s.name] = STEP_KINDS.get(s.kind)(s.config, sets)
    return Plan(steps, prepared, data_sets[0].split("=", 1)[1] if data_sets else None)


def run_recipe(name: str, opts: Options) -> dict[str, Any]:
    """Run recipe ``name`` with ``opts``; writes and returns its summary: ``recipe``, ``quick``,
    ``data_root``, ``only`` (the steps run, or None for all), ``steps`` (per step its kind and wall
    seconds), ``results`` (the recipe's digest) and ``wall_s``."""
    from fct.io import atomic_write_json, atomic_write_text
    from fct.report import format_table

    recipe = RECIPES.get(name)()
    p = plan(recipe, opts)
    run = select(p.steps, opts.only)
    problems = missing_inputs(p.steps, p.prepared, run)
    if problems:
        raise UserError("; ".join(problems) + " (run those steps first, or add them to --only)")

    t0 = time.perf_counter()
    cache: Cache = {}
    results: dict[str, dict] = {}
    seconds: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(run, 1):
        print(f"== [{i}/{len(run)}] {s.kind} {s.name}", flush=True)
        t = time.perf_counter()
        result = p.prepared[s.name].run(cache)
        if result is not None:
            results[s.name] = result
        seconds[s.name] = {"kind": s.kind, "wall_s": round(time.perf_counter() - t, 1)}
    digest = recipe.summarise(results)
    summary = {"recipe": name, "quick": opts.quick, "data_root": p.data_root,
               "only": [s.name for s in run] if opts.only else None,
               "steps": seconds, "results": digest.results, "wall_s": round(time.perf_counter() - t0, 1)}
    path = recipe.out / f"{recipe.summary_stem}.json"
    atomic_write_json(summary, path)
    step_table = format_table(["step", "kind", "wall s"],
                              [[n, v["kind"], v["wall_s"]] for n, v in seconds.items()])
    text = "\n\n".join(t for t in (digest.text, step_table, f"wall time: {summary['wall_s']} s") if t)
    atomic_write_text(text + "\n", path.with_suffix(".md"))
    print(text)
    print(f"summary: {path}, tables: {path.with_suffix('.md')}")
    return summary
