"""``make quickstart``: the whole pipeline on the embedded ``digits`` data set, end to end.

Trains an old model (classes 0-4) and a new model (classes 0-9), an FCT transformation and a
FastFill transformation from old to new (no side-information), evaluates old/old, new/new, new/old
and new/h(old) for both, prints the table and writes ``runs/quickstart/summary.json``. Rerunning resumes or reuses
finished work (each step is resumable through its run folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from fct.cli import run_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "quickstart"
OUT = Path("runs/quickstart")
CASES = [("old/old", "old_old"), ("new/new", "new_new"), ("new/old", "new_old"),
         ("new/h(old) FCT", "new_h_fct"), ("new/h(old) FastFill", "new_h_fastfill")]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override applied to both backbone configs, e.g. --set epochs=2")
    args = p.parse_args(argv)

    from fct.config import BackboneConfig, EvalConfig, load_config
    from fct.config.transformation import TransformationConfig
    from fct.training.transformation import train_transformation
    from fct.evaluate import evaluate
    from fct.io import atomic_write_json
    from fct.report import format_table
    from fct.training.backbone import train_backbone

    t0 = time.perf_counter()
    for version in ("old", "new"):
        print(f"== training the {version} backbone", flush=True)
        cfg = load_config(BackboneConfig, CONFIGS / f"digits_backbone_{version}.yaml", args.overrides)
        train_backbone(cfg)
    for kind in ("fct", "fastfill"):
        print(f"== training the {kind} transformation", flush=True)
        train_transformation(load_config(TransformationConfig, CONFIGS / f"digits_transformation_{kind}.yaml"))
    cache: dict = {}
    summary: dict = {"cases": {}}
    for case, name in CASES:
        cfg = load_config(EvalConfig, CONFIGS / f"digits_eval_{name}.yaml", ["eval_params.verbose=false"])
        res = evaluate(cfg, cache=cache)
        summary["cases"][case] = {k: res[k] for k in ("top1", "top5", "mAP")}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(summary, OUT / "summary.json")
    rows = [[case, v["top1"], v["top5"], v["mAP"]] for case, v in summary["cases"].items()]
    print(format_table(["case (query/gallery)", "top-1", "top-5", "mAP"], rows))
    print(f"summary written to {OUT / 'summary.json'} ({summary['seconds']} s)")


if __name__ == "__main__":
    sys.exit(run_main(main))
