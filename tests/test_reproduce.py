"""make reproduce-cpu: every step of the pipeline runs (--quick) on a tiny stand-in made here, and
the Tiny-ImageNet configs load against the real stand-in when it is present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fct.config import BackboneConfig, EvalConfig, load_config
from fct.config.transformation import TransformationConfig

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "tinyimagenet100-32"


def tiny_stand_in(root: Path, per_class_train: int = 2, per_class_val: int = 2) -> Path:
    """100 classes of 32x32 RGB images, a colour per class plus noise (the stand-in's layout)."""
    g = np.random.default_rng(0)
    colours = g.integers(0, 256, (100, 3))
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        labels = np.repeat(np.arange(100), n)
        images = np.clip(colours[labels][:, None, None, :] + g.normal(0, 30, (len(labels), 32, 32, 3)), 0, 255)
        np.savez(root / f"{split}.npz", images=images.astype(np.uint8), labels=labels.astype(np.int64))
    return root


def test_quick_pipeline_runs_end_to_end(tmp_path):
    data = tiny_stand_in(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fct.reproduce", "--quick", "--data-root", str(data)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "reproduce_cpu"
    summary = json.loads((out / "summary.json").read_text())
    cases = {(c["case"], c["side_info"]) for c in summary["cases"]}
    assert ("FCT new/h(old)", "yes") in cases and ("backfilling AUC, FastFill, sigma order", "no") in cases
    assert len(summary["checks"]) == 4 and all(isinstance(c["holds"], bool) for c in summary["checks"])
    assert (out / "backfilling.png").stat().st_size > 1000 and "CIFAR-100 top-1" in (out / "table.md").read_text()
    assert (out / "models" / "side_info_simclr.pt").is_file()


def test_missing_data_is_a_user_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fct.reproduce", "--data-root", str(tmp_path / "nowhere")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_configs_point_at_the_stand_in():
    if not SHARED.is_dir():
        pytest.skip(f"the Tiny-ImageNet stand-in is absent ({SHARED})")
    configs = REPO / "configs" / "tinyimagenet"
    kinds = {"backbone": BackboneConfig, "side": BackboneConfig, "transformation": TransformationConfig,
             "eval": EvalConfig}
    for path in sorted(configs.glob("*.yaml")):
        cls = kinds[path.stem.split("_")[0]]
        cfg = load_config(cls, path)
        assert (REPO / cfg.dataset_params.data_root).resolve() == SHARED.resolve()
