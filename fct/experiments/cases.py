"""Evaluation cases as the retrieval recipes (quickstart, reproduce) name and read them: a case is
known by its config's stem (``new_h_fct``), its step is ``eval-new-h-fct``; a case's three
metrics, and backfilling AUC rows with their curves plotted side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fct.experiments.steps import Step

METRICS = ("top1", "top5", "mAP")
# --quick: two backfilling steps and two random orders instead of the configs' curves.
QUICK_BACKFILLING = ("eval_params.backfilling=2", "eval_params.backfilling_random_seeds=2")


def eval_step(case: str) -> str:
    """The step name of the evaluation case ``case`` (a config stem): ``new_h_fct`` -> ``eval-new-h-fct``."""
    return "eval-" + case.replace("_", "-")


def eval_steps(cases: Sequence[str], configs: Path, pattern: str, aucs: Sequence[tuple[str, str, str]],
               quick: bool) -> list[Step]:
    """One eval step per case, its config ``configs / pattern.format(case=case)``; in a quick run
    the cases read for backfilling AUCs get ``QUICK_BACKFILLING``."""
    backfilled = {case for _, case, _ in aucs}
    return [Step("eval", eval_step(case), configs / pattern.format(case=case),
                 QUICK_BACKFILLING if quick and case in backfilled else ()) for case in cases]


def case_metrics(result: dict[str, Any]) -> dict[str, float]:
    """top-1, top-5 and mAP (%) of one evaluation step's result."""
    return {k: result[k] for k in METRICS}


def backfilling_summary(results: dict[str, dict], aucs: Sequence[tuple[str, str, str]], plot_path: Path,
                        title: str) -> dict[str, dict[str, float]]:
    """AUC rows ``(row label, case, ordering)`` -> {row: {metric: AUC (mean of the curve's points)}},
    and one plot of those curves (mean over runs) side by side."""
    from fct.plots import plot_backfilling
    from fct.retrieval.backfilling import BackfillCurve

    rows: dict[str, dict[str, float]] = {}
    curves = {}
    for label, case, order in aucs:
        entry: dict[str, Any] = results[eval_step(case)]["backfilling"]["orderings"][order]
        metrics = [m for m in METRICS if m in entry]
        rows[label] = {m: entry[m]["auc_mean"] for m in metrics}
        curves[label.replace("backfilling AUC, ", "")] = BackfillCurve(
            label, entry["fractions"], {m: np.array([entry[m]["points"]]) for m in metrics})
    plot_backfilling(curves, plot_path, title=title)
    return rows
