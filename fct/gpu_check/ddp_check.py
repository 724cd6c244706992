"""DDP on NCCL with SyncBatchNorm on 2..G GPUs against one GPU, through the real entry script.

``train_backbone.py`` trains CifarResNet20 (BatchNorm) on the embedded digits data once on one
GPU and once under ``torchrun --standalone --nproc_per_node g`` for g in 2, 4, 8, ... up to G
(and G itself), same config and global batch. Data order, shards and augmentation are functions
of (seed, epoch, sample) and DDP averages gradients, so with SyncBatchNorm (statistics over the
global batch) the g-GPU run is the same optimisation as the one-GPU run; only the order of float
sums differs. A control run on 2 GPUs without SyncBatchNorm (per-GPU statistics) must land far
outside the tolerance, or the check could not see that fault.

Both sides run in fp32 with TF32 off (``NVIDIA_TF32_OVERRIDE=0``, which cuBLAS and cuDNN obey)
and deterministic kernels (``runtime.deterministic``, ``CUBLAS_WORKSPACE_CONFIG``): rounding
then comes from the sums alone, not from TF32's 10-bit mantissa.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from fct.config.samples import digits_backbone_config
from fct.gpu_check.plan import REPO
from fct.gpu_check.processes import run_command
from fct.gpu_check.results import Result, SectionContext, failed, ok, skipped, table

# Largest relative weight difference (norm of the difference over the norm of the weights, over
# every float tensor, BatchNorm running statistics included) between g GPUs and one. Reduction
# order alone gives ~1e-8 after two epochs on the CPU (tests/test_multinode.py measures 6e-9);
# real faults give ~1e-2 (a lost shard 2.7e-2, a doubled learning rate 2.0e-2, one process
# taking the whole batch 1.6e-2, same page). 1e-4 leaves GPU kernels' rounding, amplified over
# 44 SGD steps through BatchNorm, two orders of magnitude and stays two below any fault; the
# control run shows where per-GPU BatchNorm lands on the machine itself.
DDP_RTOL = 1e-4
BASE_BATCH = 64  # the digits configs' global batch; raised to a multiple of every world size


def world_sizes(num_gpus: int) -> list[int]:
    """2, 4, 8, ... up to ``num_gpus``, and ``num_gpus`` itself (2..G at a launch count that
    grows with log G, to stay within the time budget)."""
    sizes = []
    g = 2
    while g <= num_gpus:
        sizes.append(g)
        g *= 2
    if num_gpus >= 2 and num_gpus not in sizes:
        sizes.append(num_gpus)
    return sizes


def global_batch(sizes: Sequence[int], base: int = BASE_BATCH) -> int:
    """The smallest multiple of every world size that is >= ``base`` (the global batch must
    divide evenly: fct.training.loaders.check_global_batch)."""
    lcm = math.lcm(*sizes) if sizes else 1
    return lcm * math.ceil(base / lcm)


def digits_config(folder: Path, *, epochs: int, batch: int, device: str, sync_batchnorm: bool = True) -> Path:
    return digits_backbone_config(folder, epochs=epochs, batch=batch, lr=0.02, runtime={
        "device": device, "precision": "fp32", "deterministic": True, "sync_batchnorm": sync_batchnorm})


# TF32 off in cuBLAS and cuDNN, deterministic cuBLAS workspaces, one CPU thread per process.
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "NVIDIA_TF32_OVERRIDE": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def launch(config: Path, nproc: int, timeout_s: float) -> dict[str, Any]:
    """train_backbone.py on ``config``: plain for one process, under torchrun for more."""
    entry = [str(REPO / "train_backbone.py"), "--config", str(config)]
    cmd = [sys.executable, *entry] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *entry]
    log = config.parent / "launch.log"
    t = time.perf_counter()
    rc = run_command(cmd, log, timeout_s, env=LAUNCH_ENV)
    out: dict[str, Any] = {"processes": nproc, "exit_code": rc, "wall_s": round(time.perf_counter() - t, 1),
                           "log": str(log)}
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        last = lines[-1] if lines else f"exit {rc}"
        out["error"] = f"timed out after {timeout_s:.0f} s" if rc is None else last
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from fct.models import read_model_file

    return read_model_file(folder / "model.pt")["state_dict"]


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative (over all float tensors) and largest absolute difference of two state dicts;
    integer tensors (BatchNorm's num_batches_tracked) must be equal."""
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    floats = [k for k in a if a[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in floats) ** 0.5
    den = sum(float(a[k].double().norm()) ** 2 for k in floats) ** 0.5
    worst = max(floats, key=lambda k: float((a[k].double() - b[k].double()).abs().max()))
    return {"relative": num / max(den, 1e-30),
            "max_abs": float((a[worst].double() - b[worst].double()).abs().max()), "worst_tensor": worst,
            "integers_equal": all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())}


def last_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "run" / "metrics.jsonl").read_text().splitlines()[-1])


def compare_ddp(workdir: Path, sizes: Sequence[int], *, device: str, epochs: int, budget_s: float,
                rtol: float = DDP_RTOL, control: bool = True) -> Result:
    """One-process run against a ``g``-process run for each g in ``sizes`` (and the control)."""
    start = time.monotonic()
    left = lambda: budget_s - (time.monotonic() - start)  # noqa: E731
    batch = global_batch(sizes)
    cfg = lambda name, sync=True: digits_config(workdir / name, epochs=epochs, batch=batch,  # noqa: E731
                                                device=device, sync_batchnorm=sync)
    base = launch(cfg("1"), 1, max(60.0, left()))
    if base["exit_code"] != 0:
        return failed(f"the one-process run failed: {base['error']}", launches=[base])
    a = weights(workdir / "1")
    base_loss = last_metrics(workdir / "1")["train_loss"]
    rows: list[dict[str, Any]] = []
    left_out: list[int] = []
    plan = [(g, True) for g in sizes] + ([(2, False)] if control else [])
    for g, sync in plan:
        if left() <= 0:
            left_out.append(g)
            continue
        name = f"{g}" if sync else f"{g}_no_syncbn"
        run = launch(cfg(name, sync), g, max(60.0, left()))
        row: dict[str, Any] = {"gpus": g, "sync_batchnorm": sync, **run}
        if run["exit_code"] == 0:
            row.update(difference(a, weights(workdir / name)))
            row["train_loss_diff"] = abs(last_metrics(workdir / name)["train_loss"] - base_loss)
        rows.append(row)
    sci = lambda r, k: f"{r[k]:.2e}" if k in r else None  # noqa: E731
    tab = table(["processes", "SyncBatchNorm", "relative weight diff", "max abs diff", "train loss diff",
                 "wall s"],
                [[r["gpus"], r["sync_batchnorm"], sci(r, "relative") or r.get("error"), sci(r, "max_abs"),
                  sci(r, "train_loss_diff"), r["wall_s"]] for r in rows])
    fields = dict(device=device, global_batch=batch, epochs=epochs, tolerance_relative=rtol, baseline=base,
                  runs=rows, left_out=left_out, table=tab)
    synced = [r for r in rows if r["sync_batchnorm"]]
    broken = [r for r in synced if r["exit_code"] != 0]
    if broken:
        return failed(f"the {broken[0]['gpus']}-process run failed: {broken[0]['error']}", **fields)
    if not synced:
        return skipped("time budget spent after the one-process run", **fields)
    over = [r for r in synced if not (r["relative"] <= rtol and r["integers_equal"])]
    worst = max(synced, key=lambda r: r["relative"])
    if over:
        return failed(f"{over[0]['gpus']} processes differ from one by {over[0]['relative']:.2e} relative "
                      f"(tolerance {rtol:.0e}; worst tensor {over[0]['worst_tensor']})", **fields)
    ctrl = [r for r in rows if not r["sync_batchnorm"] and r["exit_code"] == 0]
    summary = (f"{', '.join(str(r['gpus']) for r in synced)} GPUs = 1 GPU within {worst['relative']:.1e} "
               f"relative (tolerance {rtol:.0e})")
    if ctrl:
        if ctrl[0]["relative"] <= rtol:
            return failed(f"the control run without SyncBatchNorm is within the tolerance too "
                          f"({ctrl[0]['relative']:.2e}): the check cannot see that fault", **fields)
        summary += f"; without SyncBatchNorm {ctrl[0]['relative']:.1e}"
    return ok(summary, **fields)


def ddp_syncbn(ctx: SectionContext) -> Result:
    n = torch.cuda.device_count() if ctx.device == "cuda" and torch.cuda.is_available() else 0
    if n < 2:
        return skipped(f"needs 2 or more CUDA devices for DDP on NCCL; found {n}")
    return compare_ddp(ctx.workdir, world_sizes(n), device="cuda", epochs=ctx.sizes.ddp_epochs,
                       budget_s=ctx.left())
