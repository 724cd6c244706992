"""What a section receives and returns.

A section is a function ``(SectionContext) -> dict``. The dict always has ``status`` ("ok",
"failed" or "skipped"), ``reason`` (None when ok: why it failed or was skipped, one line) and
``summary`` (a one-line headline for the markdown table); the runner adds ``seconds``. Anything
else is the section's own measurements. A section may also give ``table`` ({"columns": [...],
"rows": [[...], ...]}), which the markdown report prints. An exception escaping a section is
turned into ``failed`` by the runner, so one broken section never loses the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fct.gpu_check.plan import Sizes

STATUSES = ("ok", "failed", "skipped")

Result = dict[str, Any]


@dataclass(frozen=True)
class SectionContext:
    """sizes: the mode's sizes; workdir: this section's scratch folder (created); budget_s: its
    share of the time, counted from ``started`` (time.monotonic())."""

    sizes: Sizes
    workdir: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self) -> str:
        return self.sizes.device

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()


SectionFn = Callable[[SectionContext], Result]


def ok(summary: str, **fields: Any) -> Result:
    return {"status": "ok", "reason": None, "summary": summary, **fields}


def skipped(reason: str, **fields: Any) -> Result:
    return {"status": "skipped", "reason": reason, "summary": reason, **fields}


def failed(reason: str, **fields: Any) -> Result:
    return {"status": "failed", "reason": reason, "summary": reason, **fields}


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    return {"columns": list(columns), "rows": [list(r) for r in rows]}


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line (the first line of the message)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def rounded(x: Optional[float], digits: int = 3) -> Optional[float]:
    return None if x is None else round(float(x), digits)
