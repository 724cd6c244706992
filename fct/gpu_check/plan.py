"""What the GPU check runs and how big: the section order, the sizes of each mode and the time budget.

Two modes share every code path: ``gpu`` (the real check, sized to finish in under ten minutes on
one modern GPU, more GPUs only add DDP launches) and ``tiny`` (every section at toy sizes on the
CPU, so the paths are exercised where no GPU is; ``python -m fct.gpu_check --cpu``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]

# The sections in the order they run (cheap and most telling first). ``environment`` is not a
# check: it records the machine, the packages and the GPUs at the top of the report.
SECTION_ORDER = ("environment", "cuda_tests", "ddp_syncbn", "throughput", "compile", "exact_eval",
                 "feature_cache")

DEFAULT_BUDGET_S = 540.0  # the whole command, installation included: under 10 minutes with margin


@dataclass(frozen=True)
class Sizes:
    """Every size a section reads. ``budgets_s``: each section's planned share of the time; a
    section that finds its share spent stops early and says what it left out."""

    mode: str  # "gpu" or "tiny"
    device: str  # "cuda" or "cpu"
    # throughput: fwd + bwd + SGD step on a fixed in-memory batch
    throughput_archs: tuple[str, ...]  # () = every registered fct backbone
    batch: int
    image_size: int
    warmup_steps: int
    timed_steps: int
    # torch.compile on and off
    compile_archs: tuple[str, ...]
    compile_backend: str
    # exact evaluation: a clustered gallery, queries ranked slice by slice against all of it
    eval_gallery: int
    eval_queries: int
    eval_dim: int
    eval_classes: int
    eval_slice: int
    eval_knn_queries: int  # queries whose top-k lists are searched (torch and faiss)
    eval_check_queries: int  # queries ranked again on the CPU: the results must be identical
    eval_k: int
    # feature cache: transformation training on synthetic npz images
    cache_images: int
    cache_image_size: int
    cache_batch: int
    cache_workers: int
    # DDP + SyncBatchNorm on digits
    ddp_epochs: int
    budgets_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Sizes":
        raw: dict[str, Any] = json.loads(text)
        for key in ("throughput_archs", "compile_archs"):
            raw[key] = tuple(raw[key])
        return Sizes(**raw)


def gpu_sizes(cpu_count: Optional[int] = None) -> Sizes:
    """The real check. Measured shares: none yet (no GPU run so far); the estimates assume one
    H100/H200-class GPU and are enforced by each section's own clock."""
    workers = max(1, min(8, (cpu_count or 1) - 1))
    return Sizes(
        mode="gpu", device="cuda",
        throughput_archs=(), batch=256, image_size=32, warmup_steps=3, timed_steps=10,
        compile_archs=("CifarResNet20", "CifarResNet18"), compile_backend="inductor",
        eval_gallery=1_000_000, eval_queries=1_000_000, eval_dim=128, eval_classes=1000, eval_slice=25_000,
        eval_knn_queries=20_000, eval_check_queries=64, eval_k=5,
        cache_images=50_000, cache_image_size=32, cache_batch=1024, cache_workers=workers,
        ddp_epochs=2,
        budgets_s={"environment": 30, "cuda_tests": 60, "ddp_syncbn": 120, "throughput": 100, "compile": 100,
                   "exact_eval": 90, "feature_cache": 90},
    )


def tiny_sizes() -> Sizes:
    """Every section at toy sizes on the CPU: seconds each. torch.compile uses the aot_eager
    backend (graph capture and AOT autograd, no code generation: inductor's C++ build alone takes
    half a minute on two cores)."""
    return Sizes(
        mode="tiny", device="cpu",
        throughput_archs=("CifarResNet20",), batch=8, image_size=16, warmup_steps=1, timed_steps=2,
        compile_archs=("CifarResNet20",), compile_backend="aot_eager",
        eval_gallery=4000, eval_queries=600, eval_dim=32, eval_classes=20, eval_slice=250,
        eval_knn_queries=200, eval_check_queries=16, eval_k=5,
        cache_images=256, cache_image_size=16, cache_batch=64, cache_workers=0,
        ddp_epochs=1,
        budgets_s={"environment": 20, "cuda_tests": 60, "ddp_syncbn": 60, "throughput": 30, "compile": 60,
                   "exact_eval": 30, "feature_cache": 60},
    )
