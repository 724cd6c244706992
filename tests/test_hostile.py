"""A hostile but fair user: every mistake is one line ``error: ...`` with exit code 2, no traceback,
and no input or finished output is changed.

``ROWS`` is the table of bad inputs (config, data, models, features, paths), each run through the
entry script's own ``main`` as a user would run it; new entry points add their rows here. The
tests below the table reproduce, as subprocesses, the process-level findings (a refused resume,
two runs into one folder, unwritable folders, torchrun, a killed write, the umask).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import (
    REPO,
    digits_backbone_config,
    digits_transformation_config,
    free_port,
    one_error_line,
    run_cli,
    run_script,
    snapshot,
    write_backbones,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs every row may name, under one folder whose bytes no row may change: models/old.pt
    and new.pt (16-d and 24-d backbones), models/unrelated.pt (a TorchScript module that is no
    image model), features/ (stored embeddings), data/ (npz data sets: empty val split, labels
    of 1000+), a file, an empty folder and a link to old.pt."""
    import numpy as np
    from torch import nn

    root = tmp_path_factory.mktemp("world")
    write_backbones(root / "models")
    torch.jit.save(torch.jit.script(nn.Linear(10, 5)), str(root / "models" / "unrelated.pt"))
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    os.symlink(root / "models" / "old.pt", root / "link_to_old.pt")

    rng = np.random.default_rng(0)
    (root / "features").mkdir()
    labels = np.arange(60) % 5
    np.savez(root / "features" / "f8.npz", features=rng.normal(size=(60, 8)).astype(np.float32), labels=labels)
    np.savez(root / "features" / "f9.npz", features=rng.normal(size=(60, 9)).astype(np.float32), labels=labels)
    np.savez(root / "features" / "no_labels.npz", features=rng.normal(size=(60, 8)).astype(np.float32))
    np.savez(root / "features" / "f16_50.npz", features=rng.normal(size=(50, 16)).astype(np.float32),
             labels=np.arange(50) % 5)
    np.savez(root / "features" / "f24.npz", features=rng.normal(size=(60, 24)).astype(np.float32), labels=labels)
    np.savez(root / "features" / "f16.npz", features=rng.normal(size=(60, 16)).astype(np.float32), labels=labels)

    def npz_data(folder: Path, train: np.ndarray, val: np.ndarray) -> None:
        folder.mkdir(parents=True)
        for split, y in (("train", train), ("val", val)):
            images = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
            np.savez(folder / f"{split}.npz", images=images, labels=np.asarray(y, dtype=np.int64))

    npz_data(root / "data" / "empty_val", np.arange(20) % 5, np.zeros(0))
    npz_data(root / "data" / "labels_1000", 1000 + np.arange(100), 1000 + np.arange(20))
    return root


@dataclass
class Row:
    """One bad invocation: ``script`` with ``args(world, tmp)``; the error line must contain every
    fragment, and nothing under ``world`` may change."""

    id: str
    script: str
    args: Callable[[Path, Path], list[str]]
    fragments: tuple[str, ...]
    guarded: tuple[str, ...] = field(default=("models", "features", "data", "a_file", "a_folder"))


def _backbone(*sets: str, extra: str = "") -> Callable[[Path, Path], list[str]]:
    def args(world: Path, tmp: Path) -> list[str]:
        cfg = digits_backbone_config(tmp, epochs=1, extra=extra.format(world=world, tmp=tmp))
        return ["--config", str(cfg), *[x for s in sets for x in ("--set", s.format(world=world, tmp=tmp))]]

    return args


def _transformation(*sets: str) -> Callable[[Path, Path], list[str]]:
    def args(world: Path, tmp: Path) -> list[str]:
        cfg = digits_transformation_config(tmp, world / "models", epochs=1)
        return ["--config", str(cfg), *[x for s in sets for x in ("--set", s.format(world=world, tmp=tmp))]]

    return args


def _eval(body: str) -> Callable[[Path, Path], list[str]]:
    """eval.py with a config made of ``body`` (formatted with world and tmp)."""

    def args(world: Path, tmp: Path) -> list[str]:
        cfg = tmp / "eval.yaml"
        cfg.write_text(textwrap.dedent(body).format(world=world, tmp=tmp))
        return ["--config", str(cfg)]

    return args


def _yaml(text: str, script_args: Callable[[Path, Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    """A backbone config whose text is ``text`` (a raw YAML mistake) instead of the good one."""

    def args(world: Path, tmp: Path) -> list[str]:
        good = script_args(world, tmp)
        Path(good[1]).write_text(textwrap.dedent(text))
        return good

    return args


def _chain_config(world: Path, tmp: Path, output_dir: Path) -> list[str]:
    cfg = tmp / "chain.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        versions:
          - {{id: v0, model_path: {world}/models/old.pt, change: major}}
          - {{id: v1, model_path: {world}/models/new.pt, parent: v0}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 256}}
        registry_dir: {tmp}/registry
        output_dir: {output_dir}
        """))
    return ["--config", str(cfg)]


DIGITS = "dataset_params: {{name: digits, num_workers: 0, batch_size: 128}}\n"
ROWS = [
    # config mistakes
    Row("unknown-key", "train_backbone", _backbone("optimizer_params.lrr=0.1"), ("optimizer_params.lrr",)),
    Row("wrong-type", "train_backbone", _backbone("epochs=two"), ("epochs",)),
    Row("float-that-is-no-number", "train_backbone", _backbone("optimizer_params.lr=1e-3x"),
        ("optimizer_params.lr",)),
    Row("infinite-learning-rate", "train_backbone", _backbone("optimizer_params.lr=.inf"),
        ("optimizer_params.lr must be a finite number",)),
    Row("nan-loss-weight", "train_transformation", _transformation("objective_params.similarity_loss.mu_similarity=nan"),
        ("mu_similarity must be a finite number",)),
    Row("key-written-twice", "train_backbone",
        _yaml("epochs: 1\nseed: 1\nepochs: 2\n", _backbone()), ("key 'epochs' is written twice (lines 1 and 3)",)),
    Row("yaml-syntax-error", "train_backbone", _yaml("epochs: [1, 2\nseed: 1\n", _backbone()),
        ("not valid YAML at line",)),
    Row("missing-config", "eval", lambda world, tmp: ["--config", str(tmp / "nope.yaml")],
        ("config file not found",)),
    # data
    Row("empty-val-split", "train_backbone",
        _backbone("dataset_params.name=npz", "dataset_params.data_root={world}/data/empty_val",
                  "dataset_params.batch_size=4"), ("val.npz holds no images (the val split is empty)",)),
    Row("no-label-below-num_classes", "train_backbone",
        _backbone("dataset_params.name=npz", "dataset_params.data_root={world}/data/labels_1000",
                  "dataset_params.num_classes=10"), ("dataset_params.num_classes=10 keeps no image",)),
    Row("missing-data-folder", "train_backbone",
        _backbone("dataset_params.name=npz", "dataset_params.data_root={world}/data/nothing"), ("nothing",)),
    # models
    Row("missing-model", "eval", _eval("query_model_path: {world}/models/nope.pt\n"
                                         "gallery_model_path: {world}/models/old.pt\n" + DIGITS), ("nope.pt",)),
    Row("unrelated-torchscript-gallery", "eval",
        _eval("query_model_path: {world}/models/old.pt\ngallery_model_path: {world}/models/unrelated.pt\n" + DIGITS),
        ("unrelated.pt does not take the data's images",)),
    Row("unrelated-torchscript-old-model", "train_transformation",
        _transformation("old_model_path={world}/models/unrelated.pt"), ("unrelated.pt",)),
    Row("config-file-as-model", "eval", _eval("query_model_path: {world}/a_file\n"
                                              "gallery_model_path: {world}/models/old.pt\n" + DIGITS), ("a_file",)),
    Row("transformation-dims-mismatch", "train_transformation",
        _transformation("arch_params.new_embedding_dim=32"), ("new_embedding_dim",)),
    # stored embeddings
    Row("features-of-two-widths", "eval", _eval("query_features_path: {world}/features/f9.npz\n"
                                                 "gallery_features_path: {world}/features/f8.npz\n"), ("f9.npz",)),
    Row("features-without-labels", "eval", _eval("query_features_path: {world}/features/no_labels.npz\n"
                                                   "gallery_features_path: {world}/features/no_labels.npz\n"),
        ("labels",)),
    Row("results-path-is-the-features-file", "eval",
        _eval("query_features_path: {world}/features/f8.npz\ngallery_features_path: {world}/features/f8.npz\n"
              "results_path: {world}/features/f8.npz\n"), ("results_path is the input",)),
    Row("results-path-is-a-folder", "eval",
        _eval("query_features_path: {world}/features/f8.npz\ngallery_features_path: {world}/features/f8.npz\n"
              "results_path: {world}/a_folder\n"), ("results_path", "is a directory")),
    Row("results-path-is-the-gallery-model", "eval",
        _eval("query_model_path: {world}/models/old.pt\ngallery_model_path: {world}/link_to_old.pt\n" + DIGITS
              + "results_path: {world}/models/old.pt\n"), ("results_path is the input",)),
    # stored embeddings instead of models (train_transformation.py)
    Row("features-of-different-counts", "train_transformation",
        _transformation("old_features_path={world}/features/f16_50.npz", "new_features_path={world}/features/f24.npz",
                        "val_old_features_path={world}/features/f16.npz",
                        "val_new_features_path={world}/features/f24.npz"), ("f16_50.npz", "f24.npz")),
    Row("features-for-only-one-role", "train_transformation",
        _transformation("old_features_path={world}/features/f16.npz",
                        "val_old_features_path={world}/features/f16.npz"), ("new_features_path",)),
    # wrap
    Row("wrap-unknown-builder", "fct.models.wrap",
        lambda world, tmp: ["--arch", "evil/x", "--out", str(tmp / "w.pt")], ("unknown backbone family 'evil'",)),
    Row("wrap-missing-weights", "fct.models.wrap",
        lambda world, tmp: ["--arch", "torchvision/resnet18", "--pretrained-path", str(world / "nope.pth"),
                            "--out", str(tmp / "w.pt")], ("nope.pth",)),
    # python -m fct.embed (stored embeddings)
    Row("embed-missing-model", "fct.embed",
        _eval("model_path: {world}/models/nope.pt\noutput_path: {tmp}/f.npz\n" + DIGITS), ("nope.pt does not exist",)),
    Row("embed-output-not-npz", "fct.embed",
        _eval("model_path: {world}/models/old.pt\noutput_path: {tmp}/f.npy\n" + DIGITS),
        ("output_path must be a .npz features file or a folder",)),
    Row("embed-output-under-a-file", "fct.embed",
        _eval("model_path: {world}/models/old.pt\noutput_path: {world}/a_file/f.npz\n" + DIGITS),
        ("output_path", "a_file")),
    Row("embed-torchscript-that-is-no-image-model", "fct.embed",
        _eval("model_path: {world}/models/unrelated.pt\noutput_path: {tmp}/f.npz\n" + DIGITS), ("unrelated.pt",)),
    # compat.py (compatibility matrix of a chain)
    Row("compat-output_dir-is-a-file", "compat",
        lambda world, tmp: _chain_config(world, tmp, output_dir=world / "a_file"), ("output_dir", "is a file")),
    Row("compat-registry_dir-is-a-model", "compat",
        lambda world, tmp: _chain_config(world, tmp, output_dir=tmp / "out") + ["--set",
                                                                               f"registry_dir={world}/link_to_old.pt"],
        ("registry_dir", "is a file")),
    # export
    Row("export-missing-model", "fct.export",
        lambda world, tmp: ["--model", str(world / "models" / "nope.pt"), "--format", "onnx",
                            "--out", str(tmp / "h.onnx")], ("nope.pt",)),
    Row("export-a-backbone", "fct.export",
        lambda world, tmp: ["--model", str(world / "models" / "old.pt"), "--format", "torchscript",
                            "--out", str(tmp / "h.ts")], ("old.pt",)),
    Row("export-over-its-input", "fct.export",
        lambda world, tmp: ["--model", str(world / "models" / "old.pt"), "--format", "onnx",
                            "--out", str(world / "link_to_old.pt")], ("old.pt",)),
    # outputs that are inputs (same file after resolving links)
    Row("backbone-output-is-init_from", "train_backbone",
        _backbone("init_from={world}/models/old.pt", "output_model_path={world}/models/old.pt"),
        ("output_model_path is the input init_from",)),
    Row("transformation-output-is-old-model", "train_transformation",
        _transformation("output_transformation_path={world}/models/old.pt"),
        ("output_transformation_path is the input old_model_path",)),
    Row("transformation-output-is-link-to-old-model", "train_transformation",
        _transformation("output_transformed_old_model_path={world}/link_to_old.pt"),
        ("output_transformed_old_model_path is the input old_model_path",)),
    Row("transformation-output-is-new-model", "train_transformation",
        _transformation("output_transformed_old_model_path={world}/models/new.pt"),
        ("is the input new_model_path",)),
    # output locations of the wrong kind
    Row("backbone-output_dir-is-a-file", "train_backbone", _backbone("output_dir={world}/a_file"),
        ("output_dir", "is a file")),
    Row("backbone-output_model_path-is-a-folder", "train_backbone",
        _backbone("output_model_path={world}/a_folder"), ("output_model_path", "is a directory")),
    Row("backbone-output-below-a-file", "train_backbone",
        _backbone("output_model_path={world}/a_file/model.pt"), ("output_model_path", "is a file")),
    Row("transformation-output_dir-is-a-file", "train_transformation",
        _transformation("output_dir={world}/a_file"), ("output_dir", "is a file")),
    Row("transformation-cache-dir-is-a-file", "train_transformation",
        _transformation("feature_cache.dir={world}/a_file"), ("feature_cache.dir", "is a file")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line_and_exit_2(row: Row, world: Path, tmp_path: Path) -> None:
    command = ["-m", row.script] if row.script.startswith("fct.") else [f"{row.script}.py"]
    before = snapshot(*(world / g for g in row.guarded))
    r = run_cli(*command, *row.args(world, tmp_path))
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    for fragment in row.fragments:
        assert fragment in line, line
    assert snapshot(*(world / g for g in row.guarded)) == before


ENTRY_POINTS = ["train_backbone.py", "train_transformation.py", "eval.py", "interpolate.py", "compat.py",
                "fct/embed.py", "fct/export.py", "fct/models/wrap.py", "fct/models/probe.py",
                "fct/compat/convert.py", "fct/experiments/__main__.py", "fct/gpu_check/__main__.py"]


def test_every_entry_point_exits_with_run_mains_status() -> None:
    """The tests of refusals call ``run_main(main, argv)`` in process (tests/helpers.run_cli); a real
    process adds only its ``__main__`` block, which must hand run_main's status to sys.exit. One
    real process is checked end to end in test_train.py (test_user_errors_exit_2), and the tests
    below that need one (locks, permissions, concurrent runs) run real processes."""
    for path in ENTRY_POINTS:
        text = (REPO / path).read_text()
        tail = text[text.rindex('\nif __name__ == "__main__":'):]
        block = [line.strip() for line in tail.splitlines() if line.strip()]
        assert block[0] == 'if __name__ == "__main__":' and block[-1] == "sys.exit(run_main(main))", path
        assert set(block[1:-1]) <= {"from fct.cli import run_main"}, path
    found = {str(p.relative_to(REPO)) for p in [*REPO.glob("*.py"), *(REPO / "fct").rglob("*.py")]
             if "sys.exit(run_main(main" in p.read_text()}
    assert found == set(ENTRY_POINTS)


def test_an_unforeseen_file_system_refusal_is_one_line(capsys) -> None:
    from fct.cli import run_main

    def main(argv):
        raise PermissionError(13, "Permission denied", "/data/out/results.json")

    assert run_main(main, []) == 2
    assert one_error_line(capsys.readouterr().err) == "error: /data/out/results.json: Permission denied"

    def bug(argv):
        raise OSError("not about a file")

    with pytest.raises(OSError):  # a bug stays visible in full
        run_main(bug, [])


# --------------------------------------------------------------------------------------------
# 1. A refused resume leaves the run folder as it was, and names every changed key.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refused_resume_leaves_config_yaml_untouched(tmp_path, killed_after_first_epoch):
    import fct.training.backbone as tb
    from fct.config import BackboneConfig, load_config

    cfg = digits_backbone_config(tmp_path, epochs=2)
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        tb.train_backbone(load_config(BackboneConfig, cfg))
    run = tmp_path / "run"
    before = snapshot(run)
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", "optimizer_params.lr=0.05",
                "--set", "arch_params.embedding_dim=32")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "arch_params.embedding_dim, optimizer_params.lr changed" in line, line
    assert snapshot(run) == before  # config.yaml still says what the checkpoint was trained with


@pytest.mark.slow
def test_refused_transformation_resume_leaves_config_yaml_untouched(tmp_path):
    models = write_backbones(tmp_path / "models")
    cfg = digits_transformation_config(tmp_path, models, epochs=1)
    assert run_cli("train_transformation.py", "--config", str(cfg)).returncode == 0
    run = tmp_path / "run"
    before = snapshot(run)
    r = run_cli("train_transformation.py", "--config", str(cfg), "--set", "optimizer_params.lr=0.01",
                "--set", "arch_params.inner_dim=8", "--set", "seed=1")
    assert r.returncode == 2
    assert "arch_params.inner_dim, optimizer_params.lr, seed changed" in one_error_line(r.stderr)
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------
# 2. One run per folder: an OS lock that dies with its process.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path):
    cfg = digits_backbone_config(tmp_path, epochs=2)
    cmd = [sys.executable, "train_backbone.py", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by another run (PID" in one_error_line(loser)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.slow
def test_a_held_folder_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    from fct.training.run_folder import RunLock

    cfg = digits_backbone_config(tmp_path, epochs=1)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        r = run_script("train_backbone.py", "--config", str(cfg))
    finally:
        lock.release()
    assert r.returncode == 2
    assert f"{tmp_path / 'run'} is in use by another run (PID {os.getpid()})" in one_error_line(r.stderr)
    assert not (tmp_path / "run" / "config.yaml").exists()

    # a holder killed with SIGKILL leaves no stale lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fct.training.run_folder import RunLock; "
         f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    lock = RunLock(tmp_path / "run")
    lock.acquire()  # would raise UserError if the lock outlived its process
    lock.release()


# --------------------------------------------------------------------------------------------
# 3. Outputs never overwrite inputs (the subprocess the finding was made with).
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transformation_output_equal_to_old_model_keeps_the_old_model(tmp_path):
    models = write_backbones(tmp_path / "models")
    cfg = digits_transformation_config(tmp_path, models, epochs=1)
    before = snapshot(models)
    r = run_cli("train_transformation.py", "--config", str(cfg),
                "--set", f"output_transformation_path={models}/old.pt")
    assert r.returncode == 2
    assert "output_transformation_path is the input old_model_path" in one_error_line(r.stderr)
    assert snapshot(models) == before
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# 4. Unwritable output locations are named before the first step.
# --------------------------------------------------------------------------------------------


def _unprivileged() -> list[str]:
    """A command prefix that runs as an unprivileged user (root ignores folder permissions)."""
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root and cannot drop privileges with setpriv to test a read-only folder")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def open_tmp():
    """A world-readable temporary folder (pytest's own are root-only), removed afterwards."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fct-hostile-"))
    d.chmod(0o755)  # mkdtemp's 0700 would keep an unprivileged user out
    yield d
    for p in d.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(d)


@pytest.mark.slow
def test_read_only_output_folders_are_named(open_tmp, killed_after_first_epoch):
    import fct.training.backbone as tb
    from fct.config import BackboneConfig, load_config

    prefix = _unprivileged()
    env = {"HOME": str(open_tmp), "FCT_CACHE_DIR": str(open_tmp / "cache")}
    ro = open_tmp / "ro"
    ro.mkdir()
    cfg = digits_backbone_config(open_tmp, epochs=2)
    open_tmp.chmod(0o777)  # writable for the unprivileged user, except ro/
    ro.chmod(0o555)
    cases = [
        (["--set", f"output_dir={ro}/run"], "output_dir: cannot write into"),  # a new run
        (["--set", f"output_model_path={ro}/model.pt"], "output_model_path: cannot write into"),
    ]
    for sets, fragment in cases:
        r = run_script("train_backbone.py", "--config", str(cfg), *sets, prefix=prefix, env_extra=env)
        assert r.returncode == 2, r.stderr
        assert fragment in one_error_line(r.stderr)

    # a resume into a run folder that has become read-only
    ro.chmod(0o755)
    resumed = digits_backbone_config(ro, epochs=2)
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        tb.train_backbone(load_config(BackboneConfig, resumed))
    for p in ro.rglob("*"):
        p.chmod(0o555 if p.is_dir() else 0o444)
    ro.chmod(0o555)
    before = snapshot(ro)
    r = run_script("train_backbone.py", "--config", str(resumed), prefix=prefix, env_extra=env)
    assert r.returncode == 2, r.stderr
    assert f"cannot write into {ro} (Permission denied)" in one_error_line(r.stderr)
    assert snapshot(ro) == before


@pytest.mark.slow
def test_output_model_path_that_is_a_folder_fails_before_training(tmp_path):
    cfg = digits_backbone_config(tmp_path, epochs=1)
    (tmp_path / "model.pt").mkdir()
    r = run_script("train_backbone.py", "--config", str(cfg))
    assert r.returncode == 2
    assert "output_model_path" in one_error_line(r.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first epoch


# --------------------------------------------------------------------------------------------
# 8. torchrun: a batch the processes cannot share stops before the process group does work.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_not_divisible_by_world_size_under_torchrun(tmp_path):
    cfg = digits_backbone_config(tmp_path, epochs=1)
    t0 = time.monotonic()
    r = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "train_backbone.py", "--config", str(cfg), "--set", "dataset_params.batch_size=63")
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    # one line from rank 0; torchrun then reports the workers' exit code 2 in its own summary
    assert errors == ["error: dataset_params.batch_size=63 (the global batch) is not divisible by the 2 processes"]
    assert "exitcode  : 2" in r.stderr
    assert time.monotonic() - t0 < 120  # no rank waits for a collective that never comes
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# 14. A model with a non-finite buffer is never checkpointed.
# --------------------------------------------------------------------------------------------


def test_non_finite_batchnorm_buffer_is_not_checkpointed(tmp_path, monkeypatch):
    import fct.training.backbone as tb
    import fct.training.loop as loop
    from fct.config import BackboneConfig, load_config
    from fct.errors import RunError

    original = loop.train_one_epoch

    def epoch_that_breaks_batchnorm(step_fn, loader, optimizer, lr_at, epoch, rt, scaler=None):
        out = original(step_fn, loader, optimizer, lr_at, epoch, rt, scaler)
        if epoch == 1:  # the loss stayed finite, but a running variance overflowed
            bn = next(m for m in net_holder["net"].modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return out

    net_holder = {}
    original_wrap = loop.wrap_ddp

    def keep_net(model, rt):
        net_holder["net"] = model
        return original_wrap(model, rt)

    monkeypatch.setattr(loop, "train_one_epoch", epoch_that_breaks_batchnorm)
    monkeypatch.setattr(loop, "wrap_ddp", keep_net)
    with pytest.raises(RunError, match=r"after epoch 2, .*running_var holds a non-finite value"):
        tb.train_backbone(load_config(BackboneConfig, digits_backbone_config(tmp_path, epochs=3)))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()


# --------------------------------------------------------------------------------------------
# 15. Temporary files of a killed write are removed; files honour the umask.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stale_temp_files_are_removed_on_start(tmp_path):
    cfg = digits_backbone_config(tmp_path, epochs=1)
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint.pt.k1ll3d.tmp", run / ".config.yaml.x.tmp", tmp_path / ".model.pt.abc.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    unrelated = tmp_path / ".other.pt.abc.tmp"  # not this run's output: left alone
    unrelated.write_bytes(b"someone else's")
    r = run_cli("train_backbone.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stale)
    assert unrelated.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_files_honour_the_umask(tmp_path, umask):
    from fct.io import atomic_write_json, atomic_torch_save

    old = os.umask(umask)
    try:
        atomic_write_json({"a": 1}, tmp_path / "r.json")
        atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    for name in ("r.json", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.slow
def test_training_outputs_honour_the_umask(tmp_path):
    cfg = digits_backbone_config(tmp_path, epochs=1)
    r = run_script("-c", textwrap.dedent(f"""\
        import os, sys
        os.umask(0o022)
        sys.argv = ["train_backbone.py", "--config", {str(cfg)!r}]
        import runpy
        runpy.run_path("train_backbone.py", run_name="__main__")
        """))
    assert r.returncode == 0, r.stderr
    for p in (tmp_path / "model.pt", tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "config.yaml"):
        assert p.stat().st_mode & 0o777 == 0o644, p
