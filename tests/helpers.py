"""What many test files need: the repo path, running a script as a user would, a free port,
tiny model files and config writers."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence
from unittest import mock

REPO = Path(__file__).resolve().parent.parent


def run_script(*args: str, cwd: Optional[os.PathLike] = None, env_extra: Optional[dict] = None,
               prefix: Sequence[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repo root (or ``cwd``), output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*prefix, sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_cli(*args: str, cwd: Optional[os.PathLike] = None,
            env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python ARGS`` (a script of the repo root, or ``-m MODULE``) run in this process, as its
    ``__main__`` runs it: its ``main`` through ``fct.cli.run_main``, stdout and stderr captured.

    For the tests of refusals, which end before any work: no interpreter and no torch import to
    start (about 4 s each here). What a real process adds stays tested: test_hostile.py checks that
    every entry point's ``__main__`` hands run_main's status to sys.exit, and test_train.py's
    refusals run as real processes. An exception that ``run_main`` lets through (a traceback in a
    real process) propagates to the test."""
    from fct.cli import run_main

    if args[0] == "-m":
        module, rest = importlib.import_module(args[1]), args[2:]
    else:
        spec = importlib.util.spec_from_file_location(f"_script_{Path(args[0]).stem}", REPO / args[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rest = args[1:]
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd or REPO)  # (contextlib.chdir needs Python 3.11)
    try:
        with mock.patch.dict(os.environ, env_extra or {}), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = run_main(module.main, list(rest))
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([sys.executable, *args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(stderr: str) -> str:
    """The single ``error: ...`` line a user mistake must produce (asserts there is only it)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def write_backbones(folder: Path, specs: Sequence[tuple[str, int, int]] = (("old", 16, 0), ("new", 24, 1))) -> Path:
    """Untrained CifarResNet20 model files ``folder/<name>.pt`` for (name, embedding_dim, seed)."""
    import torch

    from fct.models import build_backbone, save_model_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, dim, seed in specs:
        torch.manual_seed(seed)
        arch = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": dim, "last_nonlin": True}
        save_model_file(folder / f"{name}.pt", build_backbone(**arch), kind="backbone", arch_params=arch)
    return folder


def digits_backbone_config(folder: Path, epochs: int = 2, extra: str = "", name: str = "backbone.yaml",
                           tensorboard: bool = False) -> Path:
    """A train_backbone.py config on the first 5 digits: model.pt and run/ in ``folder``."""
    from fct.config import samples

    return samples.digits_backbone_config(folder, epochs=epochs, num_classes=5, extra=extra, name=name,
                                          runtime={"tensorboard": tensorboard})


def digits_transformation_config(folder: Path, models: Path, epochs: int = 2, extra: str = "",
                                 name: str = "transformation.yaml") -> Path:
    """A train_transformation.py config from ``models``/old.pt (16-d) to new.pt (24-d) on digits."""
    text = textwrap.dedent(f"""\
        old_model_path: {models}/old.pt
        new_model_path: {models}/new.pt
        arch_params: {{arch: MLP_BN_SIDE_PROJECTION, old_embedding_dim: 16, new_embedding_dim: 24, inner_dim: 32}}
        optimizer_params: {{algorithm: adam, lr: 0.001}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 64}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 0}}
        epochs: {epochs}
        seed: 7
        feature_cache: {{enabled: true, views: 2, dir: {folder}/cache}}
        output_transformation_path: {folder}/h.pt
        output_transformed_old_model_path: {folder}/old_transformed.pt
        output_dir: {folder}/run
        runtime: {{progress: false, tensorboard: false}}
        """) + extra
    p = folder / name
    p.write_text(text)
    return p


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """The bytes of every file under ``paths`` (files or folders), to assert nothing changed;
    a run folder's ``.lock`` (which holds the last holder's PID) is left out."""
    out: dict[Path, bytes] = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            if f.name != ".lock":
                out[f] = f.read_bytes()
    return out
