"""``make quickstart``: the whole pipeline on the embedded ``digits`` data set, end to end.

Trains an old model (classes 0-4) and a new model (classes 0-9), an FCT transformation and a
FastFill transformation from old to new (no side-information), evaluates old/old, new/new, new/old
and new/h(old) for both, with backfilling curves (FCT: random order; FastFill: its own uncertainty
order; both: the distance oracle), then a three-version chain (v0 on classes 0-2, v1 on 0-5, v2 on
0-9) trained independently, with BCT, with learned backward maps and with FCT transformations between
the independent versions, and its compatibility matrices.
Prints the tables and writes ``runs/quickstart/summary.json``, ``runs/quickstart/backfilling.png``
and ``runs/quickstart/chain/matrix_<method>/``. Rerunning resumes or reuses finished work (each step
is resumable through its run folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from fct.cli import run_main
from fct.compat.suite import ChainSuite, chain_summary, chain_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "quickstart"
OUT = Path("runs/quickstart")
CASES = [("old/old", "old_old"), ("new/new", "new_new"), ("new/old", "new_old"),
         ("new/h(old) FCT", "new_h_fct"), ("new/h(old) FastFill", "new_h_fastfill")]
# (summary row, eval case, ordering): backfilling AUCs (mean of the curve's points, in %).
AUCS = [("backfilling AUC, FCT, random order", "new_h_fct", "random"),
        ("backfilling AUC, FastFill, sigma order", "new_h_fastfill", "sigma"),
        ("backfilling AUC, FCT, distance oracle", "new_h_fct", "distance"),
        ("backfilling AUC, FastFill, distance oracle", "new_h_fastfill", "distance")]
CHAIN = ChainSuite(CONFIGS, v0="digits_chain_v0.yaml", backbone="digits_chain_{v}_{m}.yaml",
                   transformation="digits_chain_fct_{h}.yaml", matrix="digits_chain_matrix_{m}.yaml")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override applied to every backbone config, e.g. --set epochs=2")
    p.add_argument("--no-chain", action="store_true", help="skip the three-version chain")
    args = p.parse_args(argv)

    from fct.pipeline import Step, backfilling_summary, run_steps, write_summary
    from fct.report import format_table

    t0 = time.perf_counter()
    steps = [Step("backbone", f"{v} backbone", CONFIGS / f"digits_backbone_{v}.yaml") for v in ("old", "new")]
    steps += [Step("transformation", f"{k} transformation", CONFIGS / f"digits_transformation_{k}.yaml")
              for k in ("fct", "fastfill")]
    steps += [Step("eval", name, CONFIGS / f"digits_eval_{name}.yaml") for _, name in CASES]
    if not args.no_chain:
        steps += CHAIN.steps()
    run = run_steps(steps, {"backbone": args.overrides})
    summary: dict = {"cases": {case: {k: run.results[name][k] for k in ("top1", "top5", "mAP")}
                               for case, name in CASES}}
    summary["cases"].update(backfilling_summary(run.results, AUCS, OUT / "backfilling.png",
                                                "digits: backfilling the gallery from h(old) to new"))
    summary["backfilling_plot"] = str(OUT / "backfilling.png")
    if not args.no_chain:
        summary["chain"] = chain_summary(run.results)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_summary(summary, OUT / "summary.json")
    rows = [[case, v["top1"], v["top5"], v["mAP"]] for case, v in summary["cases"].items()]
    print(format_table(["case (query/gallery)", "top-1", "top-5", "mAP"], rows))
    if "chain" in summary:
        print(chain_table(summary["chain"]))
    print(f"summary written to {OUT / 'summary.json'}, curves to {OUT / 'backfilling.png'} "
          f"({summary['seconds']} s)")


if __name__ == "__main__":
    sys.exit(run_main(main))
