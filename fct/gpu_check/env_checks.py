"""The environment block of the report and the CUDA-only tests of the suite.

The CUDA-only tests are found by reading tests/ (``ast``), not by a marker: a test function is
CUDA-only when it skips itself when CUDA is absent, i.e. it calls ``pytest.skip`` under an ``if``
whose condition contains ``not <...cuda...>``, or carries a ``skipif`` decorator that names cuda.
New tests written that way join the check without a list to keep up to date.
"""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from fct.gpu_check.plan import REPO
from fct.gpu_check.processes import run_command
from fct.gpu_check.results import Result, SectionContext, failed, ok, one_line, skipped, table


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def faiss_info() -> dict[str, Any]:
    """Which faiss is importable, from which distribution, and whether it has GPU support."""
    dists = {d: _version(d) for d in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11",
                                      "faiss-gpu-cuvs", "faiss-gpu-cu12-cuvs", "faiss-gpu-cu13-cuvs")}
    info: dict[str, Any] = {"distributions": {d: v for d, v in dists.items() if v}}
    try:
        import faiss
    except ImportError as e:
        info.update(importable=False, error=one_line(e))
        return info
    gpu_build = hasattr(faiss, "StandardGpuResources")
    info.update(importable=True, module=getattr(faiss, "__file__", None),
                version=getattr(faiss, "__version__", None), gpu_build=gpu_build,
                num_gpus=int(faiss.get_num_gpus()) if gpu_build else 0)
    if len(info["distributions"]) > 1:
        info["warning"] = "more than one faiss distribution is visible: " + ", ".join(info["distributions"])
    return info


def environment(ctx: SectionContext) -> Result:
    import numpy
    import torch

    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    nccl = None
    if cuda:
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            nccl = f"unavailable ({one_line(e)})"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "nccl": nccl,
        "cuda_available": cuda, "gpus": gpus, "numpy": numpy.__version__,
        "torchvision": _version("torchvision"), "triton": _version("triton"), "faiss": faiss_info(),
        "git_commit": commit,
    }
    names = f"{len(gpus)} x {', '.join(sorted({g['name'] for g in gpus}))}" if gpus else "no CUDA device"
    summary = (f"{names}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
               f"python {platform.python_version()}")
    return ok(summary, environment=env)


# --------------------------------------------------------------------------- CUDA-only tests


def _mentions_cuda(node: ast.AST) -> bool:
    return "cuda" in ast.unparse(node).lower()


def _skips_without_cuda(fn: ast.FunctionDef) -> bool:
    for dec in fn.decorator_list:
        text = ast.unparse(dec)
        if "skipif" in text and "cuda" in text.lower():
            return True
    for node in ast.walk(fn):
        if not isinstance(node, ast.If):
            continue
        negated = any(isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not) and _mentions_cuda(n.operand)
                      for n in ast.walk(node.test))
        skips = any(isinstance(n, ast.Call) and ast.unparse(n.func) == "pytest.skip"
                    for stmt in node.body for n in ast.walk(stmt))
        if negated and skips:
            return True
    return False


def discover_cuda_tests(tests_dir: Path = REPO / "tests") -> list[str]:
    """Node ids (``tests/test_x.py::test_y``, relative to the repo) of the tests that skip
    themselves without CUDA."""
    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                fns = [node]
            elif isinstance(node, ast.ClassDef):
                fns = [n for n in node.body if isinstance(n, ast.FunctionDef)]
            else:
                fns = []
            prefix = f"::{node.name}" if isinstance(node, ast.ClassDef) else ""
            for fn in fns:
                if fn.name.startswith("test") and _skips_without_cuda(fn):
                    ids.append(f"{path.relative_to(tests_dir.parent).as_posix()}{prefix}::{fn.name}")
    return ids


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    outcomes: dict[str, str] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            child = case.find(kind)
            if child is not None:
                message = (child.get("message") or "").strip().splitlines()
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                if message:
                    outcome += f": {message[0][:200]}"
                break
        outcomes[name] = outcome
    counts = {k: sum(1 for v in outcomes.values() if v.split(":")[0] == k)
              for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": outcomes}


def cuda_tests(ctx: SectionContext) -> Result:
    import torch

    ids = discover_cuda_tests()
    if not ids:
        return skipped("no CUDA-only test found in tests/")
    xml = ctx.workdir / "junit.xml"
    log = ctx.workdir / "pytest.log"
    limit = max(30.0, ctx.left())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids]
    rc = run_command(cmd, log, limit)
    if rc is None:
        return failed(f"pytest did not finish within {limit:.0f} s", selected=ids)
    if not xml.exists():
        tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
        return failed(f"pytest exited with code {rc} and wrote no report: {' '.join(tail)}", selected=ids)
    res = read_junit(xml)
    c = res["counts"]
    fields = dict(selected=ids, exit_code=rc, **res,
                  table=table(["test", "outcome"], sorted(res["tests"].items())))
    counts = f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped"
    if c["failed"] or c["error"] or rc not in (0, 5):
        return failed(f"{counts} of {len(ids)} CUDA-only tests", **fields)
    if not torch.cuda.is_available():
        return skipped(f"no CUDA device: the {len(ids)} CUDA-only tests skip themselves ({counts})", **fields)
    return ok(f"{counts} of {len(ids)} CUDA-only tests", **fields)
