"""``make regression-quick``: weight interpolation (BCWI) on ``digits`` in both update scenarios.

- added data: an old model on 30% of the training images of every class, new models fine-tuned
  from it on all of them;
- added classes: the quickstart's old model (classes 0-4), new models fine-tuned from it on 0-9.
Two fine-tuned new models per scenario (seeds 1 and 2; the soup averages them), then the sweep of
plain, Fisher-weighted and soup interpolation over alpha. Writes ``runs/quickstart/regression.json``
with each scenario's best alpha (the smallest NFR among the alphas that keep the new model's
accuracy). Every step resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fct.cli import run_main

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs" / "quickstart"
OUT = Path("runs/quickstart")


def _finetunes(scenario: str) -> list:
    from fct.pipeline import Step

    cfg = CONFIGS / f"digits_backbone_new_finetune_{scenario}.yaml"
    second = ("seed=2", f"output_model_path=runs/quickstart/models/new_ft_{scenario}_s2.pt",
              f"output_dir=runs/quickstart/new_ft_{scenario}_s2")
    return [Step("backbone", f"new model, added {scenario}, seed 1", cfg),
            Step("backbone", f"new model, added {scenario}, seed 2", cfg, second)]


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from fct.io import atomic_write_json
    from fct.pipeline import Step, run_steps

    steps = [Step("backbone", "old model on 30% of the data", CONFIGS / "digits_backbone_old_fraction.yaml"),
             *_finetunes("data"),
             Step("interpolate", "sweep, added data", CONFIGS / "digits_interpolate_data.yaml"),
             Step("backbone", "old model on classes 0-4", CONFIGS / "digits_backbone_old.yaml"),
             *_finetunes("classes"),
             Step("interpolate", "sweep, added classes", CONFIGS / "digits_interpolate_classes.yaml")]
    run = run_steps(steps)
    summary = {}
    for scenario in ("data", "classes"):
        res = run.results[f"sweep, added {scenario}"]
        summary[f"added {scenario}"] = {"reference": res["reference"], "best": res["best"]}
    summary["step_seconds"] = run.seconds
    atomic_write_json(summary, OUT / "regression.json")
    print(f"summary written to {OUT / 'regression.json'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
