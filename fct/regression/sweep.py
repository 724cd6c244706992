"""``interpolate.py``: a resumable BCWI sweep over methods and alphas (protocols.md §7).

For each (method, alpha) the interpolated model is built, its BatchNorm statistics are measured
again on training data, and it is scored on the evaluation split: classification accuracy (its
own prediction among the new model's classes), NFR / PFR / relative NFR against the old model's
predictions, retrieval top-1 and mAP (leave-one-out, the model against itself) and the retrieval
flips against old/old. Every finished point is written at once (atomically) to
``output_dir/results.json``; a rerun skips the points already there, so an interrupted sweep
resumes, and adding alphas or methods only computes the new points.

Outputs in ``output_dir``: ``results.json``, ``results.md`` (table), ``accuracy_vs_nfr.png``,
``fisher.pt`` (the old model's Fisher, reused on resume), ``flips/<method>@<alpha>.npz`` (the
flipped sample indices of each point) and, with ``save_models``, ``models/<method>_alpha<a>.pt``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fct import dist
from fct.config.interpolation import InterpolationConfig
from fct.config.loader import to_dict
from fct.errors import UserError
from fct.io import atomic_save_npz, atomic_torch_save, atomic_write_json, atomic_write_text, file_sha256
from fct.outputs import check_outputs
from fct.regression.flips import classification_flips, masked_predictions, retrieval_flips, summary
from fct.regression.interpolation import (
    average_state_dicts,
    check_compatible,
    diagonal_fisher,
    interpolate_state_dicts,
    new_class_rows,
    normalize_fisher,
    recompute_bn_stats,
)
from fct.report import format_table
from fct.runtime import Runtime, make_runtime, seed_everything

RESULTS = "results.json"
FISHER = "fisher.pt"
# Config keys that do not change any number of a point: a sweep may resume across them.
_NOT_RESULT_KEYS = ("methods", "alphas", "save_models", "runtime", "output_dir")


@dataclass
class ModelFile:
    path: str
    state: dict[str, torch.Tensor]
    arch_params: dict
    num_classes: int  # classes trained on (labels 0..num_classes-1)
    sha256: str


@dataclass
class Scores:
    """One model on the evaluation split."""

    preds: torch.Tensor  # (N,) own prediction
    rank: torch.Tensor  # (N,) retrieval first_positive_rank (leave-one-out, model vs itself)
    metrics: dict[str, Any]


def _sha256(path: str) -> str:
    return file_sha256(path)[:16]


def read_backbone(path: str, num_classes: Optional[int], what: str) -> ModelFile:
    """A backbone model file's weights and the number of classes it was trained on."""
    from fct.models import is_torchscript_file, read_model_file, strip_wrapper_prefixes

    if os.path.exists(path) and is_torchscript_file(path):
        raise UserError(f"{what} {path} is a TorchScript archive; interpolation needs fct-model "
                        "backbone files")
    data = read_model_file(path)
    if data["kind"] != "backbone":
        raise UserError(f"{what} {path} is a {data['kind']!r} model file; interpolation needs backbones")
    state = strip_wrapper_prefixes(data["state_dict"])
    width = int(data["arch_params"]["num_classes"])
    k = num_classes if num_classes is not None else data["meta"].get("trained_classes", width)
    if not isinstance(k, int) or not 1 <= k <= width:
        raise UserError(f"{what} {path}: trained classes {k!r} do not fit its {width}-wide classifier")
    return ModelFile(path, state, dict(data["arch_params"]), k, _sha256(path))


def point_key(method: str, alpha: float) -> str:
    return f"{method}@{alpha:g}"


class SweepData:
    """The evaluation split and the training subsets of the sweep, built once."""

    def __init__(self, cfg: InterpolationConfig, old_classes: int, new_classes: int) -> None:
        from fct.data import build_dataset

        dp = cfg.dataset_params
        self.cfg = cfg
        self.val = build_dataset(dp.name, dp.data_root, "val", augment=False, num_classes=dp.num_classes)
        self.bn_train = build_dataset(dp.name, dp.data_root, "train", augment=cfg.batchnorm.augment,
                                      num_classes=new_classes)
        self.fisher_train = build_dataset(dp.name, dp.data_root, "train", augment=False,
                                          num_classes=old_classes)

    def _loader(self, ds: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        dp = self.cfg.dataset_params
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(ds, batch_size=min(dp.batch_size, len(ds)),  # type: ignore[arg-type]
                          shuffle=shuffle, generator=gen,
                          num_workers=dp.num_workers, drop_last=drop_last)

    def val_loader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)

    def bn_batches(self) -> tuple[Any, int]:
        """The first ``batchnorm.num_batches`` seeded-shuffled training batches (images only),
        the same images and the same random augmentation for every point of the sweep."""
        loader = self._loader(self.bn_train, shuffle=True, drop_last=True)  # BN cannot run on 1 sample
        n = min(self.cfg.batchnorm.num_batches, len(loader))

        def images():
            # In-process loading draws the augmentation from the global generator: seed a fork of it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                for i, (x, _) in enumerate(loader):
                    if i >= n:
                        break
                    yield x
        return images(), n

    def fisher_batches(self) -> tuple[DataLoader, int]:
        """A seeded random subset of ``fisher.max_samples`` images of the old model's classes."""
        n = len(self.fisher_train)  # type: ignore[arg-type]
        m = self.cfg.fisher.max_samples
        ds: Dataset = self.fisher_train
        if m is not None and m < n:
            idx = np.random.default_rng(self.cfg.seed).permutation(n)[:m]
            ds = Subset(self.fisher_train, np.sort(idx).tolist())
        loader = self._loader(ds, shuffle=False)
        return loader, len(loader)


@torch.inference_mode()
def score_model(model: nn.Module, loader: DataLoader, rt: Runtime, num_classes: int,
                metric: str) -> tuple[Scores, torch.Tensor]:
    """Own predictions among the first ``num_classes`` logits, accuracy (%), and leave-one-out
    retrieval of the model's embeddings against themselves (top-1, mAP, %); and the labels (N,)."""
    from fct.retrieval.engine import rank_queries

    model.eval()
    feats, logits, labels = [], [], []
    for images, y in loader:
        with rt.autocast():
            out = model(rt.to_input(images))
        feats.append(out.embedding.float().cpu())
        logits.append(out.logits.float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    f, lg, lab = torch.cat(feats), torch.cat(logits), torch.cat(labels)
    preds = masked_predictions(lg, num_classes)
    ranks = rank_queries(f.to(rt.device), lab.to(rt.device), f.to(rt.device), lab.to(rt.device),
                         metric=metric, exclude_self=True, compute_map=True)
    assert ranks.ap is not None
    rank, ap = ranks.first_positive_rank.cpu(), ranks.ap.cpu()
    has = ranks.num_positives.cpu() > 0
    return Scores(preds=preds, rank=rank, metrics={
        "accuracy": 100.0 * float((preds == lab).double().mean()),
        "retrieval_top1": 100.0 * float((rank == 1).double().mean()),
        "retrieval_map": 100.0 * float(ap[has].mean()) if bool(has.any()) else None,
        "num_samples": int(len(lab)),
    }), lab


def flip_metrics(ref: Scores, cur: Scores,
                 labels: torch.Tensor) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Classification and retrieval flips of ``cur`` against the reference (old) model."""
    cls = classification_flips(ref.preds, cur.preds, labels)
    ret = retrieval_flips(ref.rank, cur.rank)
    out = {"nfr": cls["nfr"], "pfr": cls["pfr"], "relative_nfr": cls["relative_nfr"],
           "retrieval_nfr": ret["nfr"], "retrieval_pfr": ret["pfr"],
           "retrieval_relative_nfr": ret["relative_nfr"],
           "classification_flips": summary(cls), "retrieval_flips": summary(ret)}
    arrays = {"classification_negative_flips": cls["negative_flips"],
              "classification_positive_flips": cls["positive_flips"],
              "retrieval_negative_flips": ret["negative_flips"],
              "retrieval_positive_flips": ret["positive_flips"]}
    return out, arrays


def _settings(cfg: InterpolationConfig, old: ModelFile, news: list[ModelFile]) -> dict[str, Any]:
    """What the numbers of a point depend on (config minus the sweep's extent, plus model hashes)."""
    d = to_dict(cfg)
    for k in _NOT_RESULT_KEYS:
        d.pop(k, None)
    d["dataset_params"].pop("num_workers", None)
    d["old_num_classes"], d["new_num_classes"] = old.num_classes, news[0].num_classes
    d["model_sha256"] = {"old": old.sha256, "new": [m.sha256 for m in news]}
    return d


def output_files(cfg: InterpolationConfig) -> dict[str, str]:
    """Every file a sweep of ``cfg`` writes, named ``output_dir/<file>`` for the messages."""
    run = Path(cfg.run_dir)
    names = [RESULTS, "results.md", "accuracy_vs_nfr.png", "config.yaml"]
    if "fisher" in cfg.methods:
        names.append(FISHER)
    names += [f"flips/{point_key(m, a)}.npz" for m in cfg.methods for a in cfg.alphas]
    if cfg.save_models:
        names += [f"models/{m}_alpha{a:g}.pt" for m in cfg.methods for a in cfg.alphas]
    return {f"output_dir/{n}": str(run / n) for n in names}


def check_sweep_outputs(cfg: InterpolationConfig, config_path: Optional[str] = None) -> None:
    """Refuse, before any work, a run folder that is not a writable folder or whose files would
    overwrite an input (a model file, the config)."""
    inputs: dict[str, Optional[str]] = {"old_model_path": cfg.old_model_path}
    inputs.update({f"new_model_paths[{i}]": p for i, p in enumerate(cfg.new_model_paths)})
    if config_path is not None:
        inputs["--config"] = config_path
    check_outputs(files={}, inputs=inputs, folders={"output_dir": cfg.run_dir})  # first: names the key
    check_outputs(files=output_files(cfg), inputs=inputs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# Fields of a stored point (or reference row) that the table, the plot and the best-alpha pick read.
_POINT_NUMBERS = ("accuracy", "nfr", "retrieval_top1", "retrieval_nfr")


def _check_rows(path: Path, section: str, rows: Any) -> None:
    """Raise UserError unless ``rows`` maps names to points with the fields the sweep reads back."""
    if not isinstance(rows, dict):
        raise UserError(f"{path}: '{section}' is not a mapping; delete the file to start the sweep again")
    for name, row in rows.items():
        ok = isinstance(row, dict) and isinstance(row.get("method"), str) and all(
            isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool) for k in _POINT_NUMBERS)
        if not ok:
            raise UserError(f"{path}: {section} entry {name!r} is not a sweep result (needs method and "
                            f"{', '.join(_POINT_NUMBERS)}); delete the file to start the sweep again")


def load_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results file of an earlier (possibly interrupted) run with the same settings, or a new one.

    The file is parsed as strict JSON and every stored point is checked, so a damaged or
    hand-edited file is one clear error (delete it) instead of a crash halfway through the sweep."""
    from fct.training.checkpoint import first_difference

    if not path.exists():
        return {"settings": settings, "reference": {}, "points": {}}
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (OSError, ValueError) as e:  # ValueError: JSON syntax, NaN/Infinity, not UTF-8
        reason = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path}: unreadable results file ({type(e).__name__}: {reason}); "
                        "delete it to start the sweep again") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), dict):
        raise UserError(f"{path} is not a sweep results file; delete it or choose another output_dir")
    diff = first_difference(json.loads(json.dumps(settings)), data.get("settings"))
    if diff:
        raise UserError(f"{path} was computed with different settings (first difference: {diff}); "
                        "delete it or choose another output_dir")
    data.setdefault("reference", {})
    _check_rows(path, "points", data["points"])
    _check_rows(path, "reference", data["reference"])
    return data


def load_fisher_cache(path: Path, settings: dict[str, Any],
                      params: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """The raw Fisher stored in ``path`` by an earlier run with the same ``settings``; None when
    there is none or it was computed with other settings (it is then recomputed and replaced).

    ``params``: the old model's state dict; every entry must match one of its floating-point
    tensors in shape and be finite and >= 0. A file that cannot be read (damaged, or a pickle
    with code, refused by ``weights_only``) or holds anything else is a UserError saying to
    delete it: nothing in it is ever executed."""
    if not path.exists():
        return None
    fix = "delete it and rerun: the Fisher information is computed again"
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle: the error says it all
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - arbitrary bytes fail inside the unpickler in many ways
        raise UserError(f"{path}: unreadable cached Fisher information ({type(e).__name__}); {fix}") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("settings"), dict)
            and isinstance(saved.get("fisher"), dict)):
        raise UserError(f"{path} is not a Fisher cache written by interpolate.py; {fix}")
    if saved["settings"] != settings:
        return None
    fisher = saved["fisher"]
    for k, v in fisher.items():
        ref = params.get(k) if isinstance(k, str) else None
        ok = (isinstance(v, torch.Tensor) and ref is not None and ref.is_floating_point()
              and v.is_floating_point() and v.shape == ref.shape and bool(torch.isfinite(v).all())
              and bool((v >= 0).all()))
        if not ok:
            raise UserError(f"{path}: cached Fisher entry {k!r} does not fit the old model's weights "
                            f"(a finite, non-negative tensor of the weight's shape); {fix}")
    if not fisher:
        raise UserError(f"{path}: the cached Fisher information is empty; {fix}")
    return fisher


class Sweep:
    """State of one sweep: models, data, reference scores, results file."""

    def __init__(self, cfg: InterpolationConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.old = read_backbone(cfg.old_model_path, cfg.old_num_classes, "old model")
        self.news = [read_backbone(p, cfg.new_num_classes, f"new model #{i + 1}")
                     for i, p in enumerate(cfg.new_model_paths)]
        for i, m in enumerate(self.news):
            check_compatible(self.old.state, m.state, f"new model #{i + 1} ({m.path})")
            if m.num_classes != self.news[0].num_classes:
                raise UserError(f"the new models were trained on different classes "
                                f"({self.news[0].num_classes} vs {m.num_classes}); set new_num_classes")
        self.new_classes = self.news[0].num_classes
        if self.new_classes < self.old.num_classes:
            raise UserError(f"the new model knows fewer classes ({self.new_classes}) than the old one "
                            f"({self.old.num_classes})")
        self.rows = new_class_rows(self.old.num_classes, self.new_classes)
        self.run_dir = Path(cfg.run_dir)
        self.results_path = self.run_dir / RESULTS
        self.results = load_results(self.results_path, _settings(cfg, self.old, self.news))
        self.data = SweepData(cfg, self.old.num_classes, self.new_classes)
        self.model = self._build(self.news[0].state)
        self._ref: Optional[Scores] = None
        self.labels: Optional[torch.Tensor] = None
        self._fisher: Optional[dict[str, torch.Tensor]] = None
        self._soup: Optional[dict[str, torch.Tensor]] = None

    def _build(self, state: dict[str, torch.Tensor]) -> nn.Module:
        from fct.models import build_backbone

        model = build_backbone(**self.news[0].arch_params)
        model.load_state_dict(state, strict=True)
        return self.rt.prepare_model(model).eval()

    def _load(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.model.load_state_dict(state, strict=True)
        return self.model.eval()

    def _score(self, state: dict[str, torch.Tensor], num_classes: int) -> Scores:
        scores, labels = score_model(self._load(state), self.data.val_loader(), self.rt, num_classes,
                                     self.cfg.distance_metric)
        if self.labels is None:
            self.labels = labels
        return scores

    def reference(self) -> Scores:
        """The old model's scores (the flips' reference), computed once per run."""
        if self._ref is None:
            self._ref = self._score(self.old.state, self.old.num_classes)
        return self._ref

    def fisher(self) -> dict[str, torch.Tensor]:
        """The old model's normalised diagonal Fisher, from ``fisher.pt`` when it was computed before."""
        if self._fisher is None:
            path = self.run_dir / FISHER
            settings = {**to_dict(self.cfg.fisher), "old_sha256": self.old.sha256, "seed": self.cfg.seed}
            raw = load_fisher_cache(path, settings, self.old.state)
            if raw is None:
                model = self._load(self.old.state)
                loader, n = self.data.fisher_batches()
                raw = diagonal_fisher(model, loader, self.rt.device, labels=self.cfg.fisher.labels,
                                      num_classes=self.old.num_classes,
                                      progress=not dist.progress_disabled(self.rt.params.progress), total=n)
                atomic_torch_save({"settings": settings, "fisher": raw}, path)
            self._fisher = normalize_fisher(raw, self.cfg.fisher.normalize)
        return self._fisher

    def new_side(self, method: str) -> dict[str, torch.Tensor]:
        if method != "soup":
            return self.news[0].state
        if self._soup is None:
            self._soup = average_state_dicts([m.state for m in self.news])
        return self._soup

    def interpolated(self, method: str, alpha: float) -> dict[str, torch.Tensor]:
        fisher = self.fisher() if method == "fisher" else None
        return interpolate_state_dicts(self.old.state, self.new_side(method), alpha, fisher=fisher,
                                       new_class_rows=self.rows)

    def evaluate_point(self, method: str, alpha: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        state = self.interpolated(method, alpha)
        model = self._load(state)
        if self.cfg.batchnorm.recompute:
            batches, n = self.data.bn_batches()
            recompute_bn_stats(model, batches, self.rt.device, total=n,
                               progress=not dist.progress_disabled(self.rt.params.progress))
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        ref = self.reference()
        cur = self._score(state, self.new_classes)
        assert self.labels is not None
        flips, arrays = flip_metrics(ref, cur, self.labels)
        point = {"method": method, "alpha": alpha, **cur.metrics, **flips,
                 "seconds": round(time.perf_counter() - t0, 2), "finished_at": time.time()}
        if self.cfg.save_models:
            from fct.models import save_model_file

            save_model_file(self.run_dir / "models" / f"{method}_alpha{alpha:g}.pt", model, kind="backbone",
                            arch_params=self.news[0].arch_params,
                            meta={"trained_classes": self.new_classes,
                                  "interpolation": {"method": method, "alpha": alpha,
                                                    "old": self.old.path,
                                                    "new": list(self.cfg.new_model_paths)}})
        return point, arrays

    def evaluate_references(self) -> None:
        """Rows 'old' and 'new' (each new model as trained, no BatchNorm recomputation)."""
        ref = self.reference()
        assert self.labels is not None
        rows = {"old": (self.old.state, self.old.num_classes, ref)}
        for i, m in enumerate(self.news):
            name = "new" if i == 0 else f"new{i + 1}"
            rows[name] = (m.state, m.num_classes, None)
        for name, (state, k, scores) in rows.items():
            if name in self.results["reference"]:
                continue
            scores = scores or self._score(state, k)
            flips, _ = flip_metrics(ref, scores, self.labels)
            self.results["reference"][name] = {"method": name, "alpha": None, **scores.metrics, **flips}
            self.save()

    def save(self) -> None:
        atomic_write_json(self.results, self.results_path)


def _best(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: the alpha with the lowest NFR among the points at least as accurate as the
    new model, and how much of the new model's NFR it removes (the published BCWI claim)."""
    new = results["reference"].get("new")
    out: dict[str, Any] = {}
    if new is None:
        return out
    by_method: dict[str, list[dict]] = {}
    for p in results["points"].values():
        by_method.setdefault(p["method"], []).append(p)
    for method, pts in by_method.items():
        ok = [p for p in pts if p["accuracy"] >= new["accuracy"]]
        if not ok:
            out[method] = None
            continue
        b = min(ok, key=lambda p: (p["nfr"], -p["accuracy"]))
        out[method] = {"alpha": b["alpha"], "accuracy": b["accuracy"], "nfr": b["nfr"],
                       "new_accuracy": new["accuracy"], "new_nfr": new["nfr"],
                       "nfr_reduction": (1.0 - b["nfr"] / new["nfr"]) if new["nfr"] > 0 else None}
    return out


TABLE_COLUMNS = [("method", "method"), ("alpha", "alpha"), ("acc", "accuracy"), ("NFR", "nfr"),
                 ("PFR", "pfr"), ("rel NFR", "relative_nfr"), ("ret top-1", "retrieval_top1"),
                 ("ret mAP", "retrieval_map"), ("ret NFR", "retrieval_nfr"), ("ret PFR", "retrieval_pfr")]


def results_table(results: dict[str, Any], methods: list[str], alphas: list[float]) -> str:
    rows = list(results["reference"].values())
    rows += [results["points"][point_key(m, a)] for m in methods for a in sorted(alphas)
             if point_key(m, a) in results["points"]]
    return format_table([h for h, _ in TABLE_COLUMNS],
                        [[r.get(k) for _, k in TABLE_COLUMNS] for r in rows])  # None: n/a


def plot_results(results: dict[str, Any], methods: list[str], path: Path) -> None:
    """Accuracy against NFR (classification, left) and retrieval top-1 against retrieval NFR
    (right): one point per alpha, a line per method, the old and new models as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (x, y, title) in zip(axes, [("nfr", "accuracy", "classification"),
                                        ("retrieval_nfr", "retrieval_top1", "retrieval (top-1 neighbour)")]):
        for m in methods:
            pts = sorted((p for p in results["points"].values() if p["method"] == m),
                         key=lambda p: p["alpha"])
            if not pts:
                continue
            ax.plot([p[x] for p in pts], [p[y] for p in pts], marker="o", label=m)
            for p in pts:
                ax.annotate(f"{p['alpha']:g}", (p[x], p[y]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        for name, r in results["reference"].items():
            ax.plot([r[x]], [r[y]], marker="*", markersize=12, linestyle="none", label=name)
        ax.set_xlabel(f"{'retrieval ' if x.startswith('retrieval') else ''}NFR vs old (%)")
        ax.set_ylabel("top-1 (%)" if y == "retrieval_top1" else "accuracy (%)")
        ax.set_title(f"{title}; labels: alpha (old weight)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run_sweep(cfg: InterpolationConfig, rt: Optional[Runtime] = None,
              on_point: Optional[Callable[[str], None]] = None,
              config_path: Optional[str] = None) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg``; returns the results dict (also in ``results.json``).

    on_point: called with each point's key after it is computed (not for skipped points).
    config_path: the config file, refused (like the model files) as an output.
    """
    from fct.training.checkpoint import write_resolved_config

    check_sweep_outputs(cfg, config_path)
    rt = rt or make_runtime(cfg.runtime)
    if dist.world_size() > 1:
        raise UserError("interpolate.py runs in one process; start it with python, not torchrun")
    seed_everything(cfg.seed)
    sweep = Sweep(cfg, rt)
    write_resolved_config(sweep.run_dir, to_dict(cfg))
    sweep.evaluate_references()
    pending = [(m, a) for m in cfg.methods for a in cfg.alphas
               if point_key(m, a) not in sweep.results["points"]]
    done = len(cfg.methods) * len(cfg.alphas) - len(pending)
    if done:
        print(f"resuming: {done} point(s) already in {sweep.results_path}", flush=True)
    for i, (method, alpha) in enumerate(pending):
        key = point_key(method, alpha)
        point, arrays = sweep.evaluate_point(method, alpha)
        atomic_save_npz(sweep.run_dir / "flips" / f"{key}.npz", **arrays)
        sweep.results["points"][key] = point
        sweep.save()
        if on_point is not None:
            on_point(key)
        print(f"[{i + 1}/{len(pending)}] {key}: acc {point['accuracy']:.2f}  NFR {point['nfr']:.2f}  "
              f"ret top-1 {point['retrieval_top1']:.2f}  ret NFR {point['retrieval_nfr']:.2f}  "
              f"({point['seconds']:.1f} s)", flush=True)
    sweep.results["best"] = _best(sweep.results)
    sweep.save()
    table = results_table(sweep.results, list(cfg.methods), list(cfg.alphas))
    atomic_write_text(table + "\n", sweep.run_dir / "results.md")
    plot_results(sweep.results, list(cfg.methods), sweep.run_dir / "accuracy_vs_nfr.png")
    print(table)
    for method, b in sweep.results["best"].items():
        if b is None:
            print(f"{method}: no alpha reaches the new model's accuracy")
        else:
            red = "-" if b["nfr_reduction"] is None else f"{100 * b['nfr_reduction']:.0f}%"
            print(f"{method}: alpha {b['alpha']:g} keeps the new model's accuracy ({b['accuracy']:.2f} >= "
                  f"{b['new_accuracy']:.2f}) with NFR {b['nfr']:.2f} vs {b['new_nfr']:.2f} (cut by {red})")
    print(f"results in {sweep.results_path}, plot in {sweep.run_dir / 'accuracy_vs_nfr.png'}", flush=True)
    return sweep.results
