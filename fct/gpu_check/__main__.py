"""``python -m fct.gpu_check [--cpu] [--out DIR] [--budget-s S] [--only A,B] [--install]``: a
thin entry over ``fct.gpu_check.runner.run_check``. Exit code 0 when no section failed, 1 when
one did (the report says which and why), 2 for a usage error (e.g. no CUDA device without --cpu)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from fct.cli import run_main
from fct.errors import RunError, UserError
from fct.gpu_check.plan import DEFAULT_BUDGET_S, REPO, SECTION_ORDER, gpu_sizes, tiny_sizes


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fct.gpu_check", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="every section at tiny sizes on the CPU (tests the "
                   "code paths where no GPU is; the CUDA-only sections say they are skipped)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check",
                   help="report folder (default runs/gpu_check)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"total time budget in seconds, installation included (default "
                        f"{DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--only", default="", metavar="SECTION[,SECTION]",
                   help=f"run only these sections (environment always runs): {', '.join(SECTION_ORDER[1:])}")
    p.add_argument("--install", nargs="?", const=REPO / "requirements-gpu.txt", default=None, type=Path,
                   metavar="REQUIREMENTS", help="first pip-install what REQUIREMENTS (default "
                   "requirements-gpu.txt) names and this Python lacks, constrained to the torch already "
                   "present")
    p.add_argument("--in-process", action="store_true", help="run the sections in this process (no "
                   "isolation, no hard time limits; for debugging)")
    args = p.parse_args(argv)
    only = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in only if n not in SECTION_ORDER]
    if unknown:
        raise UserError(f"--only: unknown section {unknown[0]!r}; valid: {', '.join(SECTION_ORDER[1:])}")
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be > 0, got {args.budget_s}")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise UserError(f"no CUDA device is available (torch {torch.__version__}, built for CUDA "
                        f"{torch.version.cuda}); --cpu runs every section at tiny sizes on the CPU")
    from fct.gpu_check.runner import Options, run_check

    sizes = tiny_sizes() if args.cpu else gpu_sizes(os.cpu_count())
    command = shlex.join(["python", "-m", "fct.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    report = run_check(Options(sizes=sizes, out=args.out, budget_s=args.budget_s, only=only,
                               isolate=not args.in_process, install=args.install, command=command))
    c = report["counts"]
    print(f"[gpu-check] {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in "
          f"{report['total_s']:.0f} s: {args.out / 'report.json'}, {args.out / 'report.md'}")
    if c["failed"]:
        failed = [n for n, r in report["sections"].items() if r["status"] == "failed"]
        raise RunError(f"failed sections: {', '.join(failed)} (reasons in {args.out / 'report.md'})")


if __name__ == "__main__":
    sys.exit(run_main(main))
