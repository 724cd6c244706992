"""Install what ``requirements-gpu.txt`` names and this Python lacks, without touching torch.

A GPU machine brings its own CUDA build of torch (2.11 on this workplace's, 2.14 in
requirements.txt). ``requirements-gpu.txt`` therefore names no torch or torchvision, and the
install is constrained to the torch already present (``torch==<its version>``), so a dependency
that asks for torch (timm, torchvision) can never pull another build in. Only the missing
distributions are installed: on a machine that has them all, pip is not run at all (and no
network is needed). faiss's CPU and GPU builds install the same ``faiss`` module, so a faiss-cpu
inside this environment is removed before faiss-gpu goes in (one visible from the system
site-packages is shadowed by this environment's, and the report names both).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from fct.gpu_check.results import Result, failed, ok

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def distribution_name(requirement: str) -> str:
    m = _NAME.match(requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return m.group(1)


def installed_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def in_this_environment(dist: str) -> bool:
    """Whether ``dist`` is installed in this environment itself (a venv's own site-packages), not
    merely visible from the system site-packages."""
    try:
        files = metadata.distribution(dist).locate_file("")
    except metadata.PackageNotFoundError:
        return False
    return Path(str(files)).resolve().is_relative_to(Path(sys.prefix).resolve())


def constraints() -> list[str]:
    """Pins of the torch and torchvision already present (nothing when absent)."""
    return [f"{d}=={v}" for d in ("torch", "torchvision") if (v := installed_version(d))]


def install_requirements(requirements: Path, workdir: Path, timeout_s: float = 600.0) -> Result:
    """pip-install the lines of ``requirements`` whose distribution is missing, constrained to the
    present torch. Never raises for a failed install: the result says what happened."""
    lines = requirement_lines(requirements)
    missing = [r for r in lines if installed_version(distribution_name(r)) is None]
    pins = constraints()
    fields = {"requirements": str(requirements), "constraints": pins, "missing_before": missing}
    if not missing:
        return ok(f"everything in {requirements.name} is installed (torch {installed_version('torch')} kept)",
                  **fields)
    if installed_version("torch") is None:
        return failed("torch is not installed: install the machine's CUDA build of torch first (or "
                      "requirements.txt's pins), then rerun", **fields)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "pip.log"
    with open(log, "w") as f:
        gpu_faiss = any(distribution_name(r).startswith("faiss-gpu") for r in missing)
        if gpu_faiss and in_this_environment("faiss-cpu"):
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "faiss-cpu"], stdout=f,
                           stderr=subprocess.STDOUT, timeout=timeout_s)
            fields["removed"] = ["faiss-cpu"]
        pin_file = workdir / "constraints.txt"
        pin_file.write_text("".join(p + "\n" for p in pins))
        cmd = [sys.executable, "-m", "pip", "install", "--retries", "1", "--timeout", "20",
               "-c", str(pin_file), *missing]
        try:
            rc: Optional[int] = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                               timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    still = [r for r in missing if installed_version(distribution_name(r)) is None]
    fields.update(pip_exit_code=rc, missing_after=still, log=str(log))
    if rc != 0 or still:
        tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
        why = f"timed out after {timeout_s:.0f} s" if rc is None else f"pip exited with code {rc}"
        return failed(f"{why}; still missing: {', '.join(still) or 'none'} ({' '.join(tail)[:300]})",
                      **fields)
    return ok(f"installed {', '.join(missing)} (torch {installed_version('torch')} kept)", **fields)
