"""``make reproduce-cpu``: the published FCT/FastFill CIFAR-100 table, at the scale of a 2-core CPU.

On the Tiny-ImageNet stand-in (``../shared/data/tinyimagenet100-32``: 32x32, 100 classes): an old
model on classes 0-49 and a new model on 0-99 (CIFAR-style ResNet-20, 128-d), a label-free SimCLR
side-information model, then FCT without side-information, FCT with it, and FastFill; evaluates
old/old, new/new, new/old, new/h(old) for the three, and backfilling curves (FCT random and
distance, FastFill random, sigma and distance). Prints the table beside the published CIFAR-100
one, checks the expected relations, and writes ``runs/reproduce_cpu/summary.json``, ``table.md``
and ``backfilling.png``. Every step resumes (rerun the command after an interruption).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from fct.cli import run_main
from fct.pipeline import TINY_IMAGENET, tiny_imagenet_override

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tinyimagenet"
OUT = Path("runs/reproduce_cpu")

CASES = [("old/old", "old_old", "-"), ("new/new", "new_new", "-"), ("new/old", "new_old", "-"),
         ("FCT new/h(old)", "new_h_fct", "no"), ("FCT new/h(old)", "new_h_fct_side", "yes"),
         ("FastFill new/h(old)", "new_h_fastfill", "no")]
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
# --quick: a smoke run of every step (tests, or a first look at a new machine).
QUICK = {
    "backbone": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.batch_size=64"],
    "transformation": ["epochs=1", "lr_policy_params.warmup_length=0", "feature_cache.views=1",
                       "dataset_params.batch_size=64"],
    "eval": [],
}
QUICK_BACKFILLING = ("eval_params.backfilling=2", "eval_params.backfilling_random_seeds=2")


def _steps(quick: bool) -> list:
    from fct.pipeline import Step

    steps = [Step("backbone", "old backbone", CONFIGS / "backbone_old.yaml"),
             Step("backbone", "new backbone", CONFIGS / "backbone_new.yaml"),
             Step("backbone", "side-information model (SimCLR)", CONFIGS / "side_info_simclr.yaml")]
    steps += [Step("transformation", f"{k} transformation", CONFIGS / f"transformation_{k}.yaml")
              for k in ("fct", "fct_side", "fastfill")]
    backfilled = {name for _, name, _ in AUCS}
    steps += [Step("eval", name, CONFIGS / f"eval_{name}.yaml",
                   QUICK_BACKFILLING if quick and name in backfilled else ()) for _, name, _ in CASES]
    return steps


def _checks(rows: dict[tuple[str, str], dict[str, float]]) -> list[dict]:
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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None,
                   help=f"the Tiny-ImageNet stand-in (train.npz, val.npz); default {TINY_IMAGENET}")
    p.add_argument("--quick", action="store_true", help="one epoch per step, 2 backfilling steps: a smoke run")
    args = p.parse_args(argv)

    from fct.pipeline import backfilling_summary, run_steps, write_summary
    from fct.report import format_table

    data_set = tiny_imagenet_override(args.data_root)
    data_root = Path(data_set.split("=", 1)[1])
    overrides = {kind: [data_set, *(QUICK[kind] if args.quick else [])] for kind in QUICK}

    t0 = time.perf_counter()
    run = run_steps(_steps(args.quick), overrides)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for case, name, side in CASES:
        rows[(case, side)] = {k: run.results[name][k] for k in ("top1", "top5", "mAP")}
    aucs = backfilling_summary(run.results, AUCS, OUT / "backfilling.png",
                               "Tiny-ImageNet-32 (CPU): backfilling the gallery from h(old) to new")
    for label, v in aucs.items():
        rows[(label, "yes" if "side-info" in label else "no")] = v
    checks = _checks(rows)
    seconds = round(time.perf_counter() - t0, 1)

    table_rows = []
    for (case, side), v in rows.items():
        pub = PUBLISHED.get((case, side))
        table_rows.append([case, side, v["top1"], v["top5"], v["mAP"],
                           *(pub if pub else (None, None, None))])
    table = format_table(["case", "side-info", "top-1", "top-5", "mAP",
                          "CIFAR-100 top-1", "top-5", "mAP"], table_rows)
    check_table = format_table(["expected relation", "measured", "holds"],
                               [[c["check"], c["value"], "yes" if c["holds"] else "NO"] for c in checks])
    summary = {
        "quick": args.quick,
        "data_root": str(data_root),
        "cases": [{"case": case, "side_info": side, **v, "published_cifar100": PUBLISHED.get((case, side))}
                  for (case, side), v in rows.items()],
        "checks": checks,
        "step_seconds": run.seconds,
        "seconds": seconds,
        "backfilling_plot": str(OUT / "backfilling.png"),
    }
    write_summary(summary, OUT / "summary.json")
    from fct.io import atomic_write_text

    atomic_write_text(f"{table}\n\n{check_table}\n\nwall time: {seconds} s\n", OUT / "table.md")
    print(table)
    print()
    print(check_table)
    print(f"\nsummary: {OUT / 'summary.json'}, table: {OUT / 'table.md'}, curves: {OUT / 'backfilling.png'} "
          f"({seconds} s)")


if __name__ == "__main__":
    sys.exit(run_main(main))
