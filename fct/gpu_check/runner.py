"""Run the sections in order within the total time budget and keep the report current.

Each section runs in a process of its own (``fct.gpu_check.child``) by default: a CUDA error
that poisons a process (an illegal memory access, a device-side assert), a hang or a crash then
costs that section alone, every section starts with fresh GPU memory statistics, and a section
past its hard limit is stopped (SIGTERM to its process group, SIGKILL 20 s later). In-process
runs (``isolate=False``) share one interpreter: for debugging.

Time: each section has a planned share (``Sizes.budgets_s``), cut to what the total budget still
allows with a reserve for the sections after it; a section stops its own work at its share, and
its hard limit is half as much again (at least 30 s more), never past the total deadline. A
section that finds fewer than 5 s left is skipped with that reason.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fct.gpu_check.plan import SECTION_ORDER, Sizes
from fct.gpu_check.processes import run_command
from fct.gpu_check.report import write_report
from fct.gpu_check.results import STATUSES, Result, SectionContext, failed, skipped

RESERVE_PER_LATER_SECTION_S = 15.0  # kept back from a section's share for each section after it
MIN_SHARE_S = 5.0
INSTALL_LIMIT_S = 300.0  # pip's share at most (faiss-gpu and its CUDA 12 wheels: about 1 GB)


@dataclass(frozen=True)
class Options:
    sizes: Sizes
    out: Path
    budget_s: float
    only: tuple[str, ...] = ()  # () = every section
    isolate: bool = True
    install: Optional[Path] = None  # a requirements file to install the missing packages of, first
    command: str = ""


def _last_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def run_isolated(name: str, sizes_file: Path, workdir: Path, share_s: float, hard_s: float,
                 logs: Path) -> Result:
    result_file = workdir.parent / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    log = logs / f"{name}.log"
    cmd = [sys.executable, "-m", "fct.gpu_check.child", name, "--sizes", str(sizes_file),
           "--workdir", str(workdir), "--budget-s", f"{share_s:.1f}", "--result", str(result_file)]
    t = time.perf_counter()
    rc = run_command(cmd, log, hard_s)
    seconds = round(time.perf_counter() - t, 2)
    if result_file.exists():
        result = json.loads(result_file.read_text())
    elif rc is None:
        result = failed(f"stopped at its hard limit of {hard_s:.0f} s (its share was {share_s:.0f} s)")
    else:
        result = failed(f"its process exited with code {rc} before writing a result: {_last_line(log)}")
    result["seconds"] = seconds  # the process's wall time, start-up included
    result["log"] = str(log)
    return result


def run_in_process(name: str, sizes: Sizes, workdir: Path, share_s: float) -> Result:
    from fct.gpu_check.child import run_section

    return run_section(name, SectionContext(sizes, workdir, share_s))


def _counts(sections: dict[str, Result]) -> dict[str, int]:
    return {s: sum(1 for r in sections.values() if r["status"] == s) for s in STATUSES}


def run_check(opts: Options) -> dict[str, Any]:
    """Run the check; returns the report, also written to ``opts.out``/report.json and report.md."""
    start = time.monotonic()
    deadline = start + opts.budget_s
    out = opts.out
    work, logs = out / "work", out / "logs"
    for folder in (work, logs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    sizes_file = work / "sizes.json"
    sizes_file.write_text(opts.sizes.to_json())
    report: dict[str, Any] = {
        "schema": 1, "command": opts.command, "mode": opts.sizes.mode, "device": opts.sizes.device,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "finished": None,
        "complete": False, "budget_s": opts.budget_s, "total_s": 0.0, "isolated": opts.isolate,
        "environment": None, "sections": {}, "counts": {},
    }

    def save() -> None:
        report["total_s"] = round(time.monotonic() - start, 1)
        report["counts"] = _counts(report["sections"])
        write_report(report, out)

    if opts.install is not None:
        from fct.gpu_check.install import install_requirements

        t = time.perf_counter()
        result = install_requirements(opts.install, work / "install",
                                      timeout_s=min(INSTALL_LIMIT_S, max(60.0, deadline - time.monotonic())))
        result["seconds"] = round(time.perf_counter() - t, 2)
    else:
        result = skipped("not asked (--install)")
    report["sections"]["install"] = result
    names = [n for n in SECTION_ORDER if not opts.only or n in opts.only or n == "environment"]
    # Every section has its entry from the start, in order; a run stopped half-way leaves the
    # sections it did not reach saying so.
    for name in SECTION_ORDER:
        report["sections"][name] = skipped("not reached: the run stopped before this section" if name in names
                                           else f"not selected (--only {','.join(opts.only)})")
    save()
    for i, name in enumerate(names):
        later = len(names) - i - 1
        left = deadline - time.monotonic()
        share = min(opts.sizes.budgets_s[name], left - RESERVE_PER_LATER_SECTION_S * later)
        if share < MIN_SHARE_S:
            report["sections"][name] = skipped(f"the total time budget ({opts.budget_s:.0f} s) is spent")
            save()
            continue
        hard = min(share + max(30.0, share / 2), left)
        print(f"[gpu-check] {name}: up to {share:.0f} s ...", flush=True)
        wd = work / name
        wd.mkdir(parents=True, exist_ok=True)
        result = (run_isolated(name, sizes_file, wd, share, hard, logs) if opts.isolate
                  else run_in_process(name, opts.sizes, wd, share))
        if name == "environment" and "environment" in result:
            report["environment"] = result.pop("environment")
        report["sections"][name] = result
        print(f"[gpu-check] {name}: {result['status']} in {result.get('seconds', 0):.0f} s: "
              f"{result.get('summary')}", flush=True)
        save()
    report["complete"] = True
    report["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save()
    return report

