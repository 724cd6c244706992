"""``python -m fct.experiments RECIPE [options]``: run one recipe (``--help`` lists them). A thin
entry: the options go to ``fct.experiments.run_recipe``; a user error is one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fct.cli import run_main


def main(argv: Sequence[str] | None = None) -> None:
    from fct.experiments import RECIPES, Options, run_recipe
    from fct.experiments.recipe import TINY_IMAGENET

    recipes = "\n".join(f"  {name:<24} {RECIPES.get(name)().about}" for name in RECIPES)
    p = argparse.ArgumentParser(
        prog="python -m fct.experiments", epilog=f"recipes:\n{recipes}",
        description="Run a recipe: a study of many steps in order; every step resumes, so a rerun redoes "
                    "only unfinished work.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="one of the recipes below")
    p.add_argument("--data-root", type=Path, default=None,
                   help=f"Tiny-ImageNet recipes: the stand-in (train.npz, val.npz); default {TINY_IMAGENET}")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[STEP.]KEY=VALUE",
                   help="a config override (repeatable): KEY=VALUE for every backbone step, KIND.KEY=VALUE "
                        "for every step of a kind (backbone, transformation, eval, interpolate, compat), "
                        "STEP.KEY=VALUE for one step")
    p.add_argument("--quick", action="store_true", help="a smoke run of every step: one epoch per model, "
                   "short curves and sweeps")
    p.add_argument("--only", action="append", default=[], metavar="STEP[,STEP]",
                   help="run only these steps (names or shell patterns such as 'eval-*'); the steps they "
                        "need must have run before")
    args = p.parse_args(argv)
    only = tuple(n.strip() for arg in args.only for n in arg.split(",") if n.strip())
    run_recipe(args.recipe, Options(args.data_root, tuple(args.sets), args.quick, only))


if __name__ == "__main__":
    sys.exit(run_main(main))
