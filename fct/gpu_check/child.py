"""One section in a process of its own (what the runner starts, one per section):

    python -m fct.gpu_check.child SECTION --sizes SIZES.json --workdir DIR --budget-s S --result OUT.json

Whatever happens inside the section, OUT.json is written (atomically) with its result; an error
becomes ``failed`` with its one-line reason and the traceback's last lines.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Sequence

from fct.gpu_check.plan import Sizes
from fct.gpu_check.results import Result, SectionContext, failed, one_line


def run_section(name: str, ctx: SectionContext) -> Result:
    """The section's result, or ``failed`` for anything it raised; ``seconds`` added."""
    from fct.gpu_check.sections import section

    t = time.perf_counter()
    try:
        result = section(name)(ctx)
    except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
        result = failed(one_line(e), traceback=traceback.format_exc().strip().splitlines()[-12:])
    result["seconds"] = round(time.perf_counter() - t, 2)
    result.setdefault("budget_s", round(ctx.budget_s, 1))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from fct.gpu_check.report import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section")
    p.add_argument("--sizes", type=Path, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ctx = SectionContext(Sizes.from_json(args.sizes.read_text()), args.workdir, args.budget_s)
    write_json(run_section(args.section, ctx), args.result)


if __name__ == "__main__":
    main()
