"""Training-side sections: throughput per architecture (fp32 / bf16 autocast x contiguous /
channels_last), torch.compile on and off, and the feature cache's speed-up of transformation
training.

Throughput is the model's ceiling: forward + backward + SGD step on one fixed batch already on
the device (``benchmarks/bench_train.py`` adds the data pipeline); each step ends with a device
synchronisation so the host clock measures the GPU's work. "fp32" is what a training run with
``runtime.precision: fp32`` does on CUDA: TF32 convolutions and matmuls allowed (``fct.runtime``).
"""

from __future__ import annotations

import gc
import statistics
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from fct.gpu_check.results import Result, SectionContext, failed, ok, one_line, rounded, skipped, table

VARIANTS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (precision, channels_last)
NUM_CLASSES = 100


@contextmanager
def quiet_bf16_on_cpu() -> Iterator[None]:
    """make_runtime warns that bf16 on the CPU is slow: expected in the tiny mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="bf16 autocast on the CPU")
        yield


def _runtime(device: str, precision: str, channels_last: bool) -> Any:
    from fct.config import RuntimeParams
    from fct.runtime import make_runtime

    with quiet_bf16_on_cpu():
        return make_runtime(RuntimeParams(device=device, precision=precision, channels_last=channels_last,
                                          progress=False, tensorboard=False))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point: the host clock then covers the GPU's work


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _release(device: torch.device) -> None:
    gc.collect()
    _reset_memory(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def make_train_step(model: nn.Module, rt: Any) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One SGD step of cross-entropy on the model's logits, synchronised."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with rt.autocast():
            loss = nn.functional.cross_entropy(model(x).logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(rt.device)

    return step


def timed_steps(step: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor, y: torch.Tensor,
                warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the first step, median seconds of ``steps`` steps after ``warmup`` more)."""
    t = time.perf_counter()
    step(x, y)
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        step(x, y)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def _batch(rt: Any, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return rt.to_input(x), y.to(rt.device)


def measure_variant(arch: str, precision: str, channels_last: bool, ctx: SectionContext,
                    compile_backend: Optional[str] = None) -> dict[str, Any]:
    """Images/s and peak memory of one (arch, precision, memory format[, compile]) training step."""
    from fct.models import build_backbone

    s = ctx.sizes
    rt = _runtime(s.device, precision, channels_last)
    _reset_memory(rt.device)
    torch.manual_seed(0)
    model = rt.prepare_model(build_backbone(arch, num_classes=NUM_CLASSES, embedding_dim=128)).train()
    net = torch.compile(model, backend=compile_backend) if compile_backend else model
    x, y = _batch(rt, s.batch, s.image_size)
    first, median = timed_steps(make_train_step(net, rt), x, y, s.warmup_steps, s.timed_steps)
    row = {"arch": arch, "precision": precision, "channels_last": channels_last,
           "images_per_s": round(s.batch / median, 1), "step_ms": round(1000 * median, 2),
           "first_step_s": round(first, 3), "max_memory_allocated_mib": _peak_mib(rt.device)}
    del model, net, x, y
    _reset_memory(rt.device)
    return row


def _archs(ctx: SectionContext) -> list[str]:
    from fct.models.backbones import BACKBONES

    names = list(ctx.sizes.throughput_archs) or BACKBONES.names()
    # The 32-px CIFAR nets first (what fct trains at this size), then the ImageNet-stem ones.
    return sorted(names, key=lambda n: (not n.startswith("Cifar"), n))


def throughput(ctx: SectionContext) -> Result:
    s = ctx.sizes
    rows: list[dict[str, Any]] = []
    left_out: list[str] = []
    for arch in _archs(ctx):
        for precision, cl in VARIANTS:
            name = f"{arch} {precision} {'channels_last' if cl else 'contiguous'}"
            if ctx.left() <= 0:
                left_out.append(name)
                continue
            try:
                rows.append(measure_variant(arch, precision, cl, ctx))
            except Exception as e:  # noqa: BLE001 - out of memory, a kernel missing: recorded, next variant
                rows.append({"arch": arch, "precision": precision, "channels_last": cl, "error": one_line(e)})
            _release(torch.device(s.device))  # outside the except: its traceback held the batch and model
    errors = [r for r in rows if "error" in r]
    cols = ["arch", "precision", "memory format", "images/s", "step ms", "max memory MiB"]
    tab = table(cols, [[r["arch"], r["precision"], "channels_last" if r["channels_last"] else "contiguous",
                        r.get("images_per_s"), r.get("step_ms"), r.get("max_memory_allocated_mib")]
                       for r in rows])
    fields = dict(batch=s.batch, image_size=s.image_size, timed_steps=s.timed_steps, rows=rows,
                  left_out=left_out, table=tab)
    if errors:
        return failed(f"{len(errors)} of {len(rows)} variants failed ({errors[0]['error']})", **fields)
    if not rows:
        return skipped("time budget spent before the first variant", **fields)
    best = {}
    for r in rows:
        if r["arch"] not in best or r["images_per_s"] > best[r["arch"]]["images_per_s"]:
            best[r["arch"]] = r
    speedups = []
    for arch in best:
        base = [r for r in rows if r["arch"] == arch and r["precision"] == "fp32" and not r["channels_last"]]
        if base:
            speedups.append(best[arch]["images_per_s"] / base[0]["images_per_s"])
    first = rows[0]["arch"]
    top = best[first]
    summary = (f"{len(best)} archs x {len(VARIANTS)} variants, batch {s.batch} at {s.image_size} px; "
               f"{first} best {top['images_per_s']:.0f} img/s "
               f"({top['precision']}, {'channels_last' if top['channels_last'] else 'contiguous'})")
    if speedups:
        summary += f"; best over fp32 contiguous: median {statistics.median(speedups):.2f}x"
    if left_out:
        summary += f"; {len(left_out)} variants left out (time budget)"
    return ok(summary, **fields)


def compile_check(ctx: SectionContext) -> Result:
    """The training default on CUDA (bf16 autocast, channels_last), eager against torch.compile."""
    import torch._dynamo

    s = ctx.sizes
    precision, cl = ("bf16", True) if s.device == "cuda" else ("fp32", False)
    rows: list[dict[str, Any]] = []
    left_out: list[str] = []
    for i, arch in enumerate(s.compile_archs):
        # A compile takes a good part of the share: start another arch only with half of it left.
        if i > 0 and ctx.left() < ctx.budget_s / 2:
            left_out.append(arch)
            continue
        torch._dynamo.reset()
        eager = measure_variant(arch, precision, cl, ctx)
        try:
            compiled = measure_variant(arch, precision, cl, ctx, compile_backend=s.compile_backend)
        except Exception as e:  # noqa: BLE001 - no compiler, a triton error: the reason is the finding
            rows.append({"arch": arch, "precision": precision, "channels_last": cl,
                         "backend": s.compile_backend, "eager_images_per_s": eager["images_per_s"],
                         "error": one_line(e)})
            return failed(f"torch.compile ({s.compile_backend}) of {arch}: {one_line(e)}",
                          torch_version=torch.__version__, rows=rows)
        finally:
            torch._dynamo.reset()  # the compiled graphs hold the model's tensors
            _release(torch.device(s.device))
        rows.append({"arch": arch, "precision": precision, "channels_last": cl, "backend": s.compile_backend,
                     "eager_images_per_s": eager["images_per_s"],
                     "compiled_images_per_s": compiled["images_per_s"],
                     "speedup": round(compiled["images_per_s"] / eager["images_per_s"], 3),
                     # the first compiled step compiles forward and backward; minus an ordinary step
                     "compile_s": round(compiled["first_step_s"] - compiled["step_ms"] / 1000, 2),
                     "eager_max_memory_mib": eager["max_memory_allocated_mib"],
                     "compiled_max_memory_mib": compiled["max_memory_allocated_mib"]})
    tab = table(["arch", "backend", "eager img/s", "compiled img/s", "speed-up", "compile s"],
                [[r["arch"], r["backend"], r["eager_images_per_s"], r["compiled_images_per_s"], r["speedup"],
                  r["compile_s"]] for r in rows])
    r0 = rows[0]
    summary = (f"{r0['arch']} ({precision}{', channels_last' if cl else ''}, backend {r0['backend']}): "
               f"{r0['speedup']:.2f}x ({r0['eager_images_per_s']:.0f} -> "
               f"{r0['compiled_images_per_s']:.0f} img/s), "
               f"compile {r0['compile_s']:.1f} s")
    return ok(summary, torch_version=torch.__version__, rows=rows, left_out=left_out, table=tab)


# --------------------------------------------------------------------------- feature cache


def write_npz_data(root: Path, n_train: int, size: int, classes: int = NUM_CLASSES) -> Path:
    """Random uint8 images (N, size, size, 3) in fct's train.npz / val.npz format."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", max(classes, n_train // 10))):
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                 labels=(np.arange(n) % classes).astype(np.int64))
    return root


def write_frozen_models(folder: Path) -> Path:
    """Untrained CifarResNet20 old (64-d) and new (128-d) model files: their speed is what counts."""
    from fct.models import build_backbone, save_model_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, dim, seed in (("old", 64, 0), ("new", 128, 1)):
        torch.manual_seed(seed)
        arch = {"arch": "CifarResNet20", "num_classes": NUM_CLASSES, "embedding_dim": dim,
                "last_nonlin": True}
        save_model_file(folder / f"{name}.pt", build_backbone(**arch), kind="backbone", arch_params=arch)
    return folder


def transformation_config(folder: Path, data: Path, models: Path, batch: int, workers: int) -> Path:
    """FCT's h between the two models, 2 epochs on 2 views: cached and on-the-fly runs see the
    same inputs (as in benchmarks/bench_transformation.py)."""
    text = textwrap.dedent(f"""\
        old_model_path: {models}/old.pt
        new_model_path: {models}/new.pt
        arch_params: {{arch: MLP_BN_SIDE_PROJECTION, old_embedding_dim: 64, new_embedding_dim: 128,
                      inner_dim: 1024}}
        optimizer_params: {{algorithm: adam, lr: 0.001}}
        dataset_params: {{name: npz, data_root: {data}, num_workers: {workers}, batch_size: {batch}}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 0}}
        epochs: 2
        seed: 7
        feature_cache: {{enabled: true, views: 2, dir: {folder}/cache}}
        output_transformation_path: {folder}/h.pt
        output_transformed_old_model_path: {folder}/old_transformed.pt
        output_dir: {folder}/run
        runtime: {{progress: false, tensorboard: false}}
        """)
    path = folder / "transformation.yaml"
    path.write_text(text)
    return path


def _train_h(config: Path, run_dir: Path, sets: list[str]) -> dict[str, Any]:
    import json

    from fct.config import load_config
    from fct.config.transformation import TransformationConfig
    from fct.training.transformation import train_transformation

    common = [f"output_dir={run_dir}", f"output_transformation_path={run_dir}/h.pt",
              f"output_transformed_old_model_path={run_dir}/old_transformed.pt"]
    cfg = load_config(TransformationConfig, config, common + sets)
    t = time.perf_counter()
    train_transformation(cfg)
    total = time.perf_counter() - t
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x["epoch_time_s"] for x in lines]
    return {"total_s": round(total, 2), "epoch_s": [round(e, 3) for e in epochs],
            "epoch_s_median": round(statistics.median(epochs), 3),
            "val_cosine": rounded(lines[-1]["val_cosine"])}


def feature_cache(ctx: SectionContext) -> Result:
    s = ctx.sizes
    data = write_npz_data(ctx.workdir / "data", s.cache_images, s.cache_image_size)
    models = write_frozen_models(ctx.workdir / "models")
    config = transformation_config(ctx.workdir, data, models, s.cache_batch, s.cache_workers)
    runs: dict[str, dict[str, Any]] = {}
    # On the fly first: with the time share spent after two runs, the speed-up is still measured.
    for name, sets in (("on_the_fly", ["feature_cache.enabled=false"]),
                       ("cached_cold", ["feature_cache.enabled=true"]),
                       ("cached_warm", ["feature_cache.enabled=true"])):
        if ctx.left() <= 0:
            break
        runs[name] = _train_h(config, ctx.workdir / name, sets)
    cached = [k for k in ("cached_warm", "cached_cold") if k in runs]
    if "on_the_fly" not in runs or not cached:
        return skipped(f"time budget spent after {', '.join(runs) or 'nothing'}", runs=runs)
    fly = runs["on_the_fly"]["epoch_s_median"]
    for r in runs.values():
        r["epoch_speedup"] = round(fly / max(r["epoch_s_median"], 1e-9), 2)
    tab = table(["variant", "total s", "epoch s (median)", "epoch speed-up", "val cosine"],
                [[k, r["total_s"], r["epoch_s_median"], r["epoch_speedup"], r["val_cosine"]]
                 for k, r in runs.items()])
    summary = (f"a cached epoch {runs[cached[0]]['epoch_speedup']:.1f}x faster than on the fly "
               f"({s.cache_images} images at {s.cache_image_size} px, CifarResNet20 old and new, "
               f"batch {s.cache_batch})")
    return ok(summary, images=s.cache_images, image_size=s.cache_image_size, batch=s.cache_batch,
              num_workers=s.cache_workers, runs=runs, table=tab)
