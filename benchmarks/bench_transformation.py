#!/usr/bin/env python
"""Training h on cached features against on the fly: epoch time and final new/h(old) metrics.

Side by side in one process, from the same transformation config:
  cached (cold) - a fresh feature cache: the one-off cost of embedding each view, then epochs on it,
  cached (warm) - the same cache again (a later run of the same models and data),
  on the fly    - the frozen old/new(/side) models run on every augmented batch.
Each run trains in a fresh folder, then ``eval.py``'s evaluation of new/h(old) runs with the
given eval config (its gallery replaced by the run's transformed old model).

    python benchmarks/bench_transformation.py            # quickstart digits FCT config
    python benchmarks/bench_transformation.py --config configs/tinyimagenet/transformation_fct.yaml \\
        --eval-config configs/tinyimagenet/eval_new_h_fct.yaml --epochs 2 --skip-eval
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fct.config import EvalConfig, load_config  # noqa: E402
from fct.config.transformation import TransformationConfig  # noqa: E402
from fct.evaluate import evaluate  # noqa: E402
from fct.report import format_table  # noqa: E402
from fct.training.transformation import train_transformation  # noqa: E402


def run(config: Path, eval_config: Path, out: Path, name: str, sets: list[str], skip_eval: bool) -> dict:
    run_dir = out / name
    common = [f"output_dir={run_dir}", f"output_transformation_path={run_dir}/h.pt",
              f"output_transformed_old_model_path={run_dir}/old_transformed.pt",
              "runtime.progress=false", "runtime.tensorboard=false"]
    cfg = load_config(TransformationConfig, config, common + sets)
    t0 = time.perf_counter()
    train_transformation(cfg)
    total = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x["epoch_time_s"] for x in lines]
    row = {"variant": name, "total_s": total, "epoch_s_median": statistics.median(epochs),
           "epochs": len(epochs), "train_s": sum(epochs), "val_cosine": lines[-1]["val_cosine"]}
    if not skip_eval:
        ecfg = load_config(EvalConfig, eval_config, [f"gallery_model_path={run_dir}/old_transformed.pt",
                                                     "results_path=null", "eval_params.backfilling=null",
                                                     "eval_params.verbose=false", "runtime.progress=false"])
        res = evaluate(ecfg)
        row.update(top1=res["top1"], mAP=res["mAP"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/quickstart/digits_transformation_fct.yaml")
    p.add_argument("--eval-config", type=Path, default=ROOT / "configs/quickstart/digits_eval_new_h_fct.yaml")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--skip-eval", action="store_true", help="time the epochs only")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args()
    epochs = [f"epochs={args.epochs}", "lr_policy_params.warmup_length=0"] if args.epochs else []
    with tempfile.TemporaryDirectory(prefix="bench_h_") as tmp:
        out = Path(tmp)
        cache = [f"feature_cache.dir={out}/cache", "feature_cache.enabled=true"]
        rows = [run(args.config, args.eval_config, out, "cached (cold)", epochs + cache, args.skip_eval),
                run(args.config, args.eval_config, out, "cached (warm)", epochs + cache, args.skip_eval),
                run(args.config, args.eval_config, out, "on the fly", epochs + ["feature_cache.enabled=false"],
                    args.skip_eval)]
    fly = rows[2]["epoch_s_median"]
    for r in rows:
        r["epoch_speedup"] = fly / r["epoch_s_median"]
    cols = ["variant", "epochs", "total_s", "train_s", "epoch_s_median", "epoch_speedup", "val_cosine"]
    cols += [] if args.skip_eval else ["top1", "mAP"]
    print(f"config: {args.config}")
    print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
