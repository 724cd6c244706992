"""The ``reproduce`` recipe (``make reproduce-cpu``): the published FCT/FastFill CIFAR-100 table, at
the scale of a CPU, on the Tiny-ImageNet stand-in (32x32, 100 classes).

An old model on classes 0-49 and a new model on 0-99 (CIFAR-style ResNet-20, 128-d), a label-free
SimCLR side-information model, then FCT without side-information, FCT with it, and FastFill; the
cases old/old, new/new, new/old, new/h(old) for the three, and backfilling curves (FCT random and
distance, FastFill random, sigma and distance). The summary sets the table beside the published
CIFAR-100 one and checks the relations it shows (``runs/reproduce_cpu/summary.{json,md}``, curves
in ``runs/reproduce_cpu/backfilling.png``)."""

from __future__ import annotations

from pathlib import Path

from fct.experiments.cases import backfilling_summary, case_metrics, eval_step, eval_steps
from fct.experiments.recipe import CONFIGS, RECIPES, Digest, Recipe
from fct.experiments.steps import Step
from fct.report import format_table

TINY = CONFIGS / "tinyimagenet"
OUT = Path("runs/reproduce_cpu")
# (row label, case: the stem of configs/tinyimagenet/eval_<case>.yaml, side-information).
CASES = [("old/old", "old_old", "-"), ("new/new", "new_new", "-"), ("new/old", "new_old", "-"),
         ("FCT new/h(old)", "new_h_fct", "no"), ("FCT new/h(old)", "new_h_fct_side", "yes"),
         ("FastFill new/h(old)", "new_h_fastfill", "no")]
# (summary row, case, ordering): backfilling AUCs (mean of the curve's points, in %).
AUCS = [("backfilling AUC, FCT, random order", "new_h_fct", "random"),
        ("backfilling AUC, FCT+side-info, random order", "new_h_fct_side", "random"),
        ("backfilling AUC, FastFill, random order", "new_h_fastfill", "random"),
        ("backfilling AUC, FastFill, sigma order", "new_h_fastfill", "sigma"),
        ("backfilling AUC, FCT, distance oracle", "new_h_fct", "distance"),
        ("backfilling AUC, FastFill, distance oracle", "new_h_fastfill", "distance")]
# protocols.md §8: CIFAR-100, ResNet-50-128, old on 50 classes (row label -> top-1, top-5, mAP).
PUBLISHED = {
    ("old/old", "-"): (34.2, 60.6, 16.5),
    ("new/new", "-"): (56.5, 77.0, 36.3),
    ("FCT new/h(old)", "no"): (47.2, 72.6, 25.8),
    ("FCT new/h(old)", "yes"): (50.2, 73.7, 32.2),
    ("backfilling AUC, FCT, random order", "no"): (49.1, 73.6, 29.1),
    ("backfilling AUC, FastFill, sigma order", "no"): (53.6, 75.3, 32.5),
}


def steps(quick: bool) -> list[Step]:
    out = [Step("backbone", "old", TINY / "backbone_old.yaml"),
           Step("backbone", "new", TINY / "backbone_new.yaml"),
           Step("backbone", "side-info", TINY / "side_info_simclr.yaml")]
    out += [Step("transformation", f"h-{k.replace('_', '-')}", TINY / f"transformation_{k}.yaml")
            for k in ("fct", "fct_side", "fastfill")]
    out += eval_steps([case for _, case, _ in CASES], TINY, "eval_{case}.yaml", AUCS, quick)
    return out


def checks(rows: dict[tuple[str, str], dict[str, float]]) -> list[dict]:
    """The relations the published table shows, measured here (protocols.md §8)."""
    old, new = rows[("old/old", "-")]["top1"], rows[("new/new", "-")]["top1"]
    fct, fct_side = rows[("FCT new/h(old)", "no")]["top1"], rows[("FCT new/h(old)", "yes")]["top1"]
    rnd = rows[("backfilling AUC, FCT, random order", "no")]["top1"]
    sigma = rows[("backfilling AUC, FastFill, sigma order", "no")]["top1"]
    oracle = rows[("backfilling AUC, FastFill, distance oracle", "no")]["top1"]
    gap = (fct - old) / (new - old) if new != old else float("nan")
    return [
        {"check": "FCT closes >= half of the old->new top-1 gap (published 58%)",
         "value": round(100 * gap, 1), "holds": bool(gap >= 0.5)},
        {"check": "side-information adds to FCT's top-1 (published +3.0)",
         "value": round(fct_side - fct, 2), "holds": bool(fct_side > fct)},
        {"check": "FastFill sigma AUC >= FCT random AUC + 2 top-1 points (published +4.5)",
         "value": round(sigma - rnd, 2), "holds": bool(sigma >= rnd + 2)},
        {"check": "distance oracle AUC >= sigma AUC (FastFill gallery)",
         "value": round(oracle - sigma, 2), "holds": bool(oracle >= sigma)},
    ]


def summarise(results: dict[str, dict]) -> Digest:
    """Every case and AUC beside the published value, and the checks: once every case ran."""
    if not all(eval_step(case) in results for _, case, _ in CASES):
        return Digest({}, "")
    rows = {(row, side): case_metrics(results[eval_step(case)]) for row, case, side in CASES}
    aucs = backfilling_summary(results, AUCS, OUT / "backfilling.png",
                               "Tiny-ImageNet-32 (CPU): backfilling the gallery from h(old) to new")
    rows.update({(label, "yes" if "side-info" in label else "no"): v for label, v in aucs.items()})
    measured = checks(rows)
    table = format_table(["case", "side-info", "top-1", "top-5", "mAP", "CIFAR-100 top-1", "top-5", "mAP"],
                         [[case, side, v["top1"], v["top5"], v["mAP"],
                           *PUBLISHED.get((case, side), (None,) * 3)]
                          for (case, side), v in rows.items()])
    check_table = format_table(["expected relation", "measured", "holds"],
                               [[c["check"], c["value"], "yes" if c["holds"] else "NO"] for c in measured])
    cases = [{"case": case, "side_info": side, **v, "published_cifar100": PUBLISHED.get((case, side))}
             for (case, side), v in rows.items()]
    return Digest({"cases": cases, "checks": measured, "backfilling_plot": str(OUT / "backfilling.png")},
                  f"{table}\n\n{check_table}")


@RECIPES.register("reproduce")
def reproduce() -> Recipe:
    return Recipe(
        about="the published FCT/FastFill table at CPU scale on the Tiny-ImageNet stand-in, with its checks",
        out=OUT, steps=steps, summarise=summarise,
        quick={"backbone": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.batch_size=64"],
               "transformation": ["epochs=1", "lr_policy_params.warmup_length=0", "feature_cache.views=1",
                                  "dataset_params.batch_size=64"]},
        tiny_imagenet=True)
