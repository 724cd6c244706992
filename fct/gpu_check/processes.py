"""Child processes with a hard time limit: their own process group, output to a log file, and a
stop that reaches what they started (torchrun passes SIGTERM on to its workers)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

from fct.gpu_check.plan import REPO


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (torchrun passes it on to its workers), then, 20 s later or as
    soon as the leader is gone, SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20.0)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_command(cmd: list[str], log: Path, hard_s: float,
                env: Optional[dict[str, str]] = None) -> Optional[int]:
    """Run ``cmd`` from the repo root in its own process group with output to ``log`` (``env``:
    extra variables); its exit code, or None when it was stopped at ``hard_s`` seconds."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=hard_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return None
        except BaseException:  # Ctrl-C in the runner: take the section down with it
            _stop(proc)
            raise
