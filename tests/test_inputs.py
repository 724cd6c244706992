"""Hostile inputs (issue 13), run the way they were found: the entry script in a subprocess.

Each mistake must end with exit code 2 and exactly one stderr line ``error: ...`` naming the file
or key, never a traceback; and fct must never write into a data folder.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fct.models import build_backbone, save_model_file

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
from helpers import run_cli, run_script


def assert_user_error(r: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 2 and one stderr line ``error: <expected>...``."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), r.stderr


def write_npz(root: Path, train_labels: np.ndarray, val_labels: np.ndarray, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train_labels), ("val", val_labels)):
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        np.savez(root / f"{split}.npz", images=images, labels=np.asarray(labels, dtype=np.int64))
    return root


def backbone_config(tmp_path: Path, data_root: Path, extra: str = "") -> Path:
    p = tmp_path / "backbone.yaml"
    p.write_text(textwrap.dedent(f"""\
        arch_params: {{arch: CifarResNet20, num_classes: 10, embedding_dim: 16, last_nonlin: true}}
        optimizer_params: {{algorithm: sgd, lr: 0.1, momentum: 0.9}}
        dataset_params: {{name: npz, data_root: {data_root}, num_workers: 0, batch_size: 4{extra}}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 0}}
        epochs: 1
        output_model_path: {tmp_path}/model.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """))
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    arch = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": 16, "last_nonlin": True}
    save_model_file(d / "backbone.pt", build_backbone(**arch), kind="backbone", arch_params=arch)
    torch.jit.save(torch.jit.script(nn.Linear(10, 5)), str(d / "unrelated.pt"))  # not an image model
    return {"backbone": d / "backbone.pt", "unrelated": d / "unrelated.pt"}


# ------------------------------------------------------------------------------------- item 5
def test_empty_val_npz_names_the_file(tmp_path: Path) -> None:
    root = write_npz(tmp_path / "data", np.arange(20) % 5, np.zeros(0))
    r = run_cli("train_backbone.py", "--config", str(backbone_config(tmp_path, root)),
                env_extra={"FCT_CACHE_DIR": str(tmp_path / "cache")})
    assert_user_error(r, f"{root}/val.npz holds no images (the val split is empty)")


# ------------------------------------------------------------------------------------ item 11
@pytest.mark.slow
def test_num_classes_below_every_label_names_file_key_and_range(tmp_path: Path) -> None:
    root = write_npz(tmp_path / "data", 1000 + np.arange(100), 1000 + np.arange(20))
    cfg = backbone_config(tmp_path, root, extra=", num_classes: 10")
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", "dataset_params.batch_size=64",
                env_extra={"FCT_CACHE_DIR": str(tmp_path / "cache")})
    assert_user_error(r, f"dataset_params.num_classes=10 keeps no image of {root}/train.npz: "
                         "its labels run from 1000 to 1099")


# ------------------------------------------------------------------------------------- item 6
@pytest.mark.slow
def test_eval_with_an_unrelated_torchscript_gallery_model(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        query_model_path: {models['backbone']}
        gallery_model_path: {models['unrelated']}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 128}}
        eval_params: {{verbose: false}}
        runtime: {{progress: false}}
        """))
    r = run_cli("eval.py", "--config", str(cfg), env_extra={"FCT_CACHE_DIR": str(tmp_path / "cache")})
    assert_user_error(r, f"{models['unrelated']} does not take the data's images: on a batch of shape "
                         "(2, 3, 8, 8) it fails with RuntimeError: mat1 and mat2 shapes cannot be multiplied")


@pytest.mark.slow
def test_train_transformation_with_an_unrelated_torchscript_old_model(tmp_path: Path,
                                                                      models: dict[str, Path]) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        old_model_path: {models['unrelated']}
        new_model_path: {models['backbone']}
        arch_params: {{arch: MLP_BN_SIDE_PROJECTION, old_embedding_dim: 5, new_embedding_dim: 16,
                      inner_dim: 8}}
        optimizer_params: {{algorithm: adam, lr: 0.001}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 64}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 0}}
        epochs: 1
        feature_cache: {{enabled: false}}
        output_transformation_path: {tmp_path}/h.pt
        output_transformed_old_model_path: {tmp_path}/old_transformed.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """))
    r = run_cli("train_transformation.py", "--config", str(cfg), env_extra={"FCT_CACHE_DIR": str(tmp_path / "cache")})
    assert_user_error(r, f"{models['unrelated']} does not take the data's images: "
                         "on a batch of shape (2, 3, 8, 8)")


# ---------------------------------------------------------------------------- data folder
@pytest.mark.slow
def test_read_only_data_folder_is_left_untouched(tmp_path: Path, models: dict[str, Path]) -> None:
    root = write_npz(tmp_path / "data", np.arange(20) % 5, np.arange(10) % 5)
    listing = {p.name: p.stat().st_mtime_ns for p in [root, *root.iterdir()]}
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        query_model_path: {models['backbone']}
        gallery_model_path: {models['backbone']}
        dataset_params: {{name: npz, data_root: {root}, num_workers: 0, batch_size: 8}}
        eval_params: {{verbose: false}}
        results_path: {tmp_path}/results.json
        runtime: {{progress: false}}
        """))
    root.chmod(0o555)
    try:
        r = run_script("eval.py", "--config", str(cfg), env_extra={"FCT_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        root.chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in [root, *root.iterdir()]} == listing
    assert len(list((tmp_path / "cache" / "mean_std").iterdir())) == 1
