"""Weight interpolation (BCWI) in both update scenarios: ``make regression-quick`` on ``digits``,
``make regression-cpu`` on the Tiny-ImageNet stand-in (``--suite tinyimagenet``).

- added data: an old model on a fraction of the training images of every class (digits 30%,
  Tiny-ImageNet 50%), new models fine-tuned from it on all of them;
- added classes: an old model on the first half of the classes (the quickstart's / the CPU
  reproduction's old model), new models fine-tuned from it on all of them.
Two fine-tuned new models per scenario (seeds 1 and 2; the soup averages them), then the sweep of
plain, Fisher-weighted and soup interpolation over alpha. Writes ``<out>/regression.json`` with
each scenario's reference models and best alpha (the smallest NFR among the alphas that keep the
new model's accuracy). Every step resumes: rerun the command after an interruption.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fct.cli import run_main
from fct.errors import UserError
from fct.pipeline import TINY_IMAGENET, tiny_imagenet_override

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


@dataclass(frozen=True)
class Suite:
    configs: Path
    out: Path
    old_fraction: str  # backbone config of the "added data" old model
    old_classes: str  # backbone config of the "added classes" old model
    finetune: str  # backbone config of the fine-tuned new models, {scenario} = data | classes
    sweep: str  # interpolation config, {scenario}


SUITES = {
    "digits": Suite(CONFIGS / "quickstart", Path("runs/quickstart"), "digits_backbone_old_fraction.yaml",
                    "digits_backbone_old.yaml", "digits_backbone_new_finetune_{scenario}.yaml",
                    "digits_interpolate_{scenario}.yaml"),
    "tinyimagenet": Suite(CONFIGS / "tinyimagenet", Path("runs/regression_cpu"), "backbone_bcwi_old_fraction.yaml",
                          "backbone_old.yaml", "backbone_bcwi_new_finetune_{scenario}.yaml",
                          "interpolate_bcwi_{scenario}.yaml"),
}
# --quick: every step, small (tests, or a first look at a new machine).
QUICK = {
    "backbone": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.batch_size=32"],
    "interpolate": ["alphas=[0.0, 0.5, 1.0]", "fisher.max_samples=64", "batchnorm.num_batches=2",
                    "dataset_params.batch_size=64"],
}


def _finetunes(suite: Suite, scenario: str) -> list:
    from fct.pipeline import Step

    cfg = suite.configs / suite.finetune.format(scenario=scenario)
    second = ("seed=2", f"output_model_path={suite.out}/models/new_ft_{scenario}_s2.pt",
              f"output_dir={suite.out}/new_ft_{scenario}_s2")
    return [Step("backbone", f"new model, added {scenario}, seed 1", cfg),
            Step("backbone", f"new model, added {scenario}, seed 2", cfg, second)]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="digits")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: one epoch per model, three alphas, a small Fisher sample")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override applied to every backbone config, e.g. --set epochs=1 (a smoke run)")
    p.add_argument("--data-root", default=None,
                   help=f"tinyimagenet only: the stand-in (train.npz, val.npz); default {TINY_IMAGENET}")
    args = p.parse_args(argv)
    from fct.io import atomic_write_json
    from fct.pipeline import Step, run_steps

    suite = SUITES[args.suite]
    overrides: dict[str, list[str]] = {"backbone": [*(QUICK["backbone"] if args.quick else []), *args.overrides],
                                       "interpolate": list(QUICK["interpolate"]) if args.quick else []}
    if args.suite == "tinyimagenet":
        data_set = tiny_imagenet_override(args.data_root)
        overrides = {kind: [data_set, *sets] for kind, sets in overrides.items()}
    elif args.data_root:
        raise UserError("--data-root is for --suite tinyimagenet (digits is embedded)")

    steps = [Step("backbone", "old model on a fraction of the data", suite.configs / suite.old_fraction),
             *_finetunes(suite, "data"),
             Step("interpolate", "sweep, added data", suite.configs / suite.sweep.format(scenario="data")),
             Step("backbone", "old model on the first half of the classes", suite.configs / suite.old_classes),
             *_finetunes(suite, "classes"),
             Step("interpolate", "sweep, added classes", suite.configs / suite.sweep.format(scenario="classes"))]
    run = run_steps(steps, overrides)
    summary: dict = {"suite": args.suite}
    for scenario in ("data", "classes"):
        res = run.results[f"sweep, added {scenario}"]
        summary[f"added {scenario}"] = {"reference": res["reference"], "best": res["best"]}
    summary["step_seconds"] = run.seconds
    atomic_write_json(summary, suite.out / "regression.json")
    print(f"summary written to {suite.out / 'regression.json'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
