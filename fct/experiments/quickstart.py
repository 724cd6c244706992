"""The ``quickstart`` recipe (``make quickstart``): the whole method on the embedded ``digits`` data
set, end to end, small enough for any machine.

An old model (classes 0-4) and a new model (classes 0-9), an FCT and a FastFill transformation
from old to new (no side-information); the cases old/old, new/new, new/old and new/h(old) for
both, with backfilling curves (FCT: random order; FastFill: its own uncertainty order; both: the
distance oracle); then the three-version chain of ``chain`` on digits (v0 on classes 0-2, v1 on
0-5, v2 on 0-9) and its compatibility matrices (``runs/quickstart/chain/matrix_<method>/``).
Summary and tables in ``runs/quickstart/summary.{json,md}``, curves in
``runs/quickstart/backfilling.png``. ``--only 'old,new,h-*,eval-*'`` skips the chain."""

from __future__ import annotations

from pathlib import Path

from fct.experiments.cases import backfilling_summary, case_metrics, eval_step, eval_steps
from fct.experiments.chain import ChainSuite, chain_summary, chain_table
from fct.experiments.recipe import CONFIGS, RECIPES, Digest, Recipe
from fct.experiments.steps import Step
from fct.report import format_table

DIGITS = CONFIGS / "quickstart"
OUT = Path("runs/quickstart")
# (summary row, case: the stem of configs/quickstart/digits_eval_<case>.yaml).
CASES = [("old/old", "old_old"), ("new/new", "new_new"), ("new/old", "new_old"),
         ("new/h(old) FCT", "new_h_fct"), ("new/h(old) FastFill", "new_h_fastfill")]
# (summary row, case, ordering): backfilling AUCs (mean of the curve's points, in %).
AUCS = [("backfilling AUC, FCT, random order", "new_h_fct", "random"),
        ("backfilling AUC, FastFill, sigma order", "new_h_fastfill", "sigma"),
        ("backfilling AUC, FCT, distance oracle", "new_h_fct", "distance"),
        ("backfilling AUC, FastFill, distance oracle", "new_h_fastfill", "distance")]
CHAIN = ChainSuite(DIGITS, v0="digits_chain_v0.yaml", backbone="digits_chain_{v}_{m}.yaml",
                   transformation="digits_chain_fct_{h}.yaml", matrix="digits_chain_matrix_{m}.yaml")


def steps(quick: bool) -> list[Step]:
    out = [Step("backbone", v, DIGITS / f"digits_backbone_{v}.yaml") for v in ("old", "new")]
    out += [Step("transformation", f"h-{k}", DIGITS / f"digits_transformation_{k}.yaml")
            for k in ("fct", "fastfill")]
    out += eval_steps([case for _, case in CASES], DIGITS, "digits_eval_{case}.yaml", AUCS, quick)
    return out + CHAIN.steps()


def summarise(results: dict[str, dict]) -> Digest:
    """The cases and backfilling AUCs once every case ran; the chain's matrices that ran."""
    out: dict = {}
    tables = []
    if all(eval_step(case) in results for _, case in CASES):
        cases = {row: case_metrics(results[eval_step(case)]) for row, case in CASES}
        cases.update(backfilling_summary(results, AUCS, OUT / "backfilling.png",
                                         "digits: backfilling the gallery from h(old) to new"))
        out["cases"] = cases
        out["backfilling_plot"] = str(OUT / "backfilling.png")
        tables.append(format_table(["case (query/gallery)", "top-1", "top-5", "mAP"],
                                   [[row, v["top1"], v["top5"], v["mAP"]] for row, v in cases.items()]))
    chain = chain_summary(results)
    if chain:
        out["chain"] = chain
        tables.append(chain_table(chain))
    return Digest(out, "\n\n".join(tables))


@RECIPES.register("quickstart")
def quickstart() -> Recipe:
    return Recipe(
        about="the whole method on the embedded digits: FCT, FastFill, backfilling, a three-version chain",
        out=OUT, steps=steps, summarise=summarise,
        # --quick keeps the backbones' epochs (they are quick on digits): trained against a barely
        # trained previous version, the learned backward maps turn the loss non-finite.
        quick={"transformation": ["epochs=1", "lr_policy_params.warmup_length=0", "feature_cache.views=1"],
               "compat": ["projection=false"]})
