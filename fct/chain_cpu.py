"""``make chain-cpu``: the three-version chain on the Tiny-ImageNet stand-in, four ways.

v0 on classes 0-32, v1 on 0-65, v2 on 0-99 (CifarResNet20-128, 6 epochs each, the CPU
reproduction's recipe; v2 trained independently is the reproduction's new model, so a finished
``make reproduce-cpu`` saves that step). Methods: independent training, BCT (influence loss through
the previous version's classifier), learned backward maps (each version trained with a map to the
previous one), and FCT forward maps h01, h12 between the independent versions. Writes each
compatibility matrix (JSON, heat-map PNG, 2-D projections) under ``runs/chain_cpu/matrix_<method>/``
and ``runs/chain_cpu/summary.json``. Every step resumes: rerun the command after an interruption.
``--methods backward,bct`` runs only those matrices and the models they need.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from fct.cli import run_main
from fct.compat.suite import CHAIN_METHODS, ChainSuite, chain_summary, chain_table
from fct.errors import UserError
from fct.pipeline import TINY_IMAGENET, tiny_imagenet_override

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tinyimagenet"
OUT = Path("runs/chain_cpu")
# --quick: every step, small (tests, or a first look at a new machine).
QUICK = {
    "backbone": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.batch_size=32"],
    "transformation": ["epochs=1", "lr_policy_params.warmup_length=0", "feature_cache.views=1",
                       "dataset_params.batch_size=64"],
    "compat": ["projection=false"],
}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None,
                   help=f"the Tiny-ImageNet stand-in (train.npz, val.npz); default {TINY_IMAGENET}")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: one epoch per model and map, no 2-D projections")
    p.add_argument("--methods", default=",".join(CHAIN_METHODS),
                   help="comma-separated methods whose matrices to run (default all: %(default)s); v0 and "
                        "the independent versions are always trained, as every matrix's references")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override applied to every backbone config, e.g. --set epochs=1 (a smoke run)")
    args = p.parse_args(argv)

    from fct.pipeline import run_steps, write_summary

    suite = ChainSuite(CONFIGS, v0="backbone_chain_v0.yaml", backbone="backbone_chain_{v}_{m}.yaml",
                       transformation="transformation_chain_fct_{h}.yaml", matrix="matrix_chain_{m}.yaml",
                       overrides=(("v2 independent", CONFIGS / "backbone_new.yaml"),))
    try:
        steps = suite.steps([m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as e:
        raise UserError(f"--methods: {e}") from None
    data_set = tiny_imagenet_override(args.data_root)
    t0 = time.perf_counter()
    overrides = {kind: [data_set, *(sets if args.quick else [])] for kind, sets in QUICK.items()}
    overrides["backbone"] += args.overrides
    run = run_steps(steps, overrides)
    summary = {"chain": chain_summary(run.results), "step_seconds": run.seconds,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_summary(summary, OUT / "summary.json")
    print(chain_table(summary["chain"]))
    print(f"summary written to {OUT / 'summary.json'} ({summary['seconds']} s)")


if __name__ == "__main__":
    sys.exit(run_main(main))
