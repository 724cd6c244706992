"""The report: ``report.json`` (everything) and ``report.md`` (the tables), both written
atomically and rewritten after every section, so a run stopped half-way still leaves what it
measured (``"complete": false``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fct.io import atomic_write_json, atomic_write_text
from fct.report import format_table


def strict(x: Any) -> Any:
    """``x`` as strict JSON: non-finite floats as None, tuples as lists, numpy / torch scalars as
    numbers, anything else unknown as its text (a section's odd value must not lose the report)."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    if callable(getattr(x, "item", None)) and getattr(x, "ndim", 0) == 0:
        return strict(x.item())
    return str(x)


def write_json(obj: Any, path: Path) -> None:
    atomic_write_json(strict(obj), path)


def _cell(v: Any) -> Any:
    """A table cell: numbers and None as they are (format_table shows them), text on one line."""
    if v is None or isinstance(v, (int, float)):
        return v
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    gpus = env.get("gpus") or []
    device = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) or "no CUDA device"
    lines = [
        "# GPU check",
        "",
        f"- command: `{report['command']}` ({report['mode']} mode"
        f"{'' if report['complete'] else ', INCOMPLETE'})",
        f"- started {report['started']}, {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget",
        f"- {len(gpus)} GPU(s): {device}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"python {env.get('python')}, commit {str(env.get('git_commit'))[:12]}",
        f"- sections: {report['counts']['ok']} ok, {report['counts']['failed']} failed, "
        f"{report['counts']['skipped']} skipped",
        "",
        format_table(["section", "status", "seconds", "summary"],
                     [[name, r["status"], r.get("seconds"), _cell(r.get("summary"))]
                      for name, r in report["sections"].items()]),
    ]
    for name, r in report["sections"].items():
        tab = r.get("table")
        if tab and tab.get("rows"):
            rows = [[_cell(v) for v in row] for row in tab["rows"]]
            lines += ["", f"## {name}", "", format_table(tab["columns"], rows)]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    report = strict(report)
    atomic_write_json(report, out / "report.json")
    atomic_write_text(markdown(report), out / "report.md")
