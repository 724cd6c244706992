"""The GPU check's virtual environment: an overlay on the Python that runs this module.

    python -m fct.gpu_check.venv DIR     (run with the machine's Python, the one with CUDA torch)

A plain ``venv --system-site-packages`` sees the *base* interpreter's packages, not those of a
virtual environment it was created from, so a torch installed in a venv (the usual case on a GPU
machine) would be invisible. Here the new environment gets a ``.pth`` file listing every
site-packages folder of the creating interpreter: they come after the environment's own, so what
the check installs (faiss-gpu) shadows what the machine has (a faiss-cpu), and the machine's
torch is used as it is. Nothing is installed into the machine's environment. Standard library
only: it runs before anything is installed.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path
from typing import Sequence

PTH_NAME = "_fct_gpu_check_parent.pth"


def parent_site_dirs() -> list[str]:
    """This interpreter's site-packages folders, in its own order."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def has_pip() -> bool:
    try:
        import pip  # noqa: F401
    except ImportError:
        return False
    return True


def make_overlay_venv(path: Path) -> Path:
    """Create (or refresh) the environment at ``path``; returns its Python."""
    python = path / "bin" / "python"
    if not python.exists():
        # Without pip of its own when this interpreter has one: the .pth makes it importable there.
        venv.EnvBuilder(with_pip=not has_pip(), symlinks=True).create(path)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / PTH_NAME).write_text("".join(d + "\n" for d in parent_site_dirs()))
    return python


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m fct.gpu_check.venv DIR")
    python = make_overlay_venv(Path(args[0]))
    print(f"[gpu-check] environment {args[0]} over {sys.executable} ({len(parent_site_dirs())} site folders)")
    del python


if __name__ == "__main__":
    main()
