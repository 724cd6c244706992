"""The regression recipes: weight interpolation (BCWI) in both update scenarios, on the embedded
``digits`` (``regression-digits``, ``make regression-quick``) and on the Tiny-ImageNet stand-in
(``regression-tinyimagenet``, ``make regression-cpu``).

- added data: an old model on a fraction of the training images of every class, new models
  fine-tuned from it on all of them;
- added classes: an old model on the first half of the classes (the quickstart's / the
  reproduction's old model), new models fine-tuned from it on all of them.
Two fine-tuned new models per scenario (seeds 1 and 2; the soup averages them), then the sweep of
plain, Fisher-weighted and soup interpolation over alpha. The summary (``<out>/regression.json``,
beside the quickstart's summary for digits) has each scenario's reference models and best alpha
(the smallest NFR among the alphas that keep the new model's accuracy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fct.experiments.recipe import CONFIGS, RECIPES, Digest, Recipe
from fct.experiments.steps import Step
from fct.report import format_table

SCENARIOS = ("data", "classes")


@dataclass(frozen=True)
class Suite:
    """Where one data set's configs and outputs are; file names take ``{scenario}`` (data, classes)."""

    configs: Path
    out: Path  # the configs' output folder, where the second fine-tuned models go too
    old_fraction: str  # backbone config of the "added data" old model
    old_classes: str  # backbone config of the "added classes" old model
    finetune: str  # backbone config of the fine-tuned new models
    sweep: str  # interpolation config


SUITES = {
    "digits": Suite(CONFIGS / "quickstart", Path("runs/quickstart"), "digits_backbone_old_fraction.yaml",
                    "digits_backbone_old.yaml", "digits_backbone_new_finetune_{scenario}.yaml",
                    "digits_interpolate_{scenario}.yaml"),
    "tinyimagenet": Suite(CONFIGS / "tinyimagenet", Path("runs/regression_cpu"),
                          "backbone_bcwi_old_fraction.yaml", "backbone_old.yaml",
                          "backbone_bcwi_new_finetune_{scenario}.yaml", "interpolate_bcwi_{scenario}.yaml"),
}


def steps(suite: Suite) -> list[Step]:
    """Per scenario: the old model, two fine-tuned new models (the second is the first's config with
    another seed and output), the sweep."""
    olds = {"data": ("old-fraction", suite.old_fraction), "classes": ("old", suite.old_classes)}
    out = []
    for scenario in SCENARIOS:
        old, old_config = olds[scenario]
        cfg = suite.configs / suite.finetune.format(scenario=scenario)
        second = ("seed=2", f"output_model_path={suite.out}/models/new_ft_{scenario}_s2.pt",
                  f"output_dir={suite.out}/new_ft_{scenario}_s2")
        out += [Step("backbone", old, suite.configs / old_config),
                Step("backbone", f"new-{scenario}-s1", cfg),
                Step("backbone", f"new-{scenario}-s2", cfg, second),
                Step("interpolate", f"sweep-{scenario}",
                     suite.configs / suite.sweep.format(scenario=scenario))]
    return out


def summarise(results: dict[str, dict]) -> Digest:
    """Per scenario whose sweep ran: the reference models and the best alpha of each method."""
    out = {}
    rows = []
    for scenario in SCENARIOS:
        if f"sweep-{scenario}" not in results:
            continue
        res = results[f"sweep-{scenario}"]
        out[f"added {scenario}"] = {"reference": res["reference"], "best": res["best"]}
        for method, b in res["best"].items():  # None: no alpha keeps the new model's accuracy
            keys = ("alpha", "accuracy", "nfr", "new_accuracy", "new_nfr", "nfr_reduction")
            rows.append([f"added {scenario}", method, *(b[k] if b else None for k in keys)])
    table = format_table(["scenario", "method", "best alpha", "acc", "NFR", "new acc", "new NFR", "NFR cut"],
                         rows) if rows else ""
    return Digest(out, table)


def _recipe(suite: Suite, tiny_imagenet: bool) -> Recipe:
    return Recipe(
        about=f"weight interpolation (BCWI) and negative flips, both update scenarios, on "
              f"{'the Tiny-ImageNet stand-in' if tiny_imagenet else 'the embedded digits'}",
        out=suite.out, steps=lambda quick: steps(suite), summarise=summarise,
        quick={"backbone": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.batch_size=32"],
               "interpolate": ["alphas=[0.0, 0.5, 1.0]", "fisher.max_samples=64", "batchnorm.num_batches=2",
                               "dataset_params.batch_size=64"]},
        tiny_imagenet=tiny_imagenet, summary_stem="regression")


@RECIPES.register("regression-digits")
def regression_digits() -> Recipe:
    return _recipe(SUITES["digits"], tiny_imagenet=False)


@RECIPES.register("regression-tinyimagenet")
def regression_tinyimagenet() -> Recipe:
    return _recipe(SUITES["tinyimagenet"], tiny_imagenet=True)
