"""Recipes: studies run as many training and evaluation steps in order, from the command line
``python -m fct.experiments RECIPE [--data-root DIR] [--set [STEP.]KEY=VALUE] [--quick] [--only STEP,...]``.

- ``steps.py``: the step kinds (train a backbone, train a transformation, evaluate, interpolate,
  score a compatibility matrix), one config file each, in the ``STEP_KINDS`` registry;
- ``recipe.py``: what a recipe is, the ``RECIPES`` registry, the options every recipe takes and
  the run itself (step selection, prerequisites, the summary with the same keys for all);
- ``cases.py``: evaluation cases as the retrieval recipes read them (metrics, backfilling AUCs);
- one module per study: ``quickstart``, ``reproduce``, ``chain``, ``regression`` (digits and
  Tiny-ImageNet).

A new study (say, a real model update on one's own data) is one more module here: its steps
(config files, in order), a ``summarise`` of their results, and ``@RECIPES.register(name)`` on a
function returning its ``Recipe``; import it below so the command line finds it."""

# Each recipe module registers its recipes on import.
from fct.experiments import chain, quickstart, real_update, regression, reproduce  # noqa: F401
from fct.experiments.recipe import RECIPES, Options, Recipe, run_recipe

__all__ = ["RECIPES", "Options", "Recipe", "run_recipe"]
