"""The Tiny-ImageNet commands (make reproduce-cpu, regression-cpu, chain-cpu): every step of each
pipeline runs (one epoch per backbone) on a tiny stand-in made here, and the Tiny-ImageNet configs
load against the real stand-in when it is present."""

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


def test_regression_cpu_runs_both_scenarios(tmp_path):
    data = tiny_stand_in(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fct.regression.quick", "--suite", "tinyimagenet", "--data-root",
                        str(data), "--quick"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "regression_cpu"
    summary = json.loads((out / "regression.json").read_text())
    assert summary["suite"] == "tinyimagenet"
    for scenario in ("added data", "added classes"):
        assert set(summary[scenario]) == {"reference", "best"}
    assert (out / "models" / "new_ft_classes_s2.pt").is_file()
    assert (tmp_path / "runs" / "reproduce_cpu" / "models" / "old.pt").is_file()  # shared with reproduce-cpu


def test_chain_cpu_runs_four_methods(tmp_path):
    data = tiny_stand_in(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fct.chain_cpu", "--data-root", str(data), "--quick"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "chain_cpu" / "summary.json").read_text())
    assert set(summary["chain"]) == {"independent", "bct", "backward", "fct"}
    for m, c in summary["chain"].items():
        assert len(c["top1"]) == 3 and all(len(row) == 3 for row in c["top1"])
        assert (tmp_path / "runs" / "chain_cpu" / f"matrix_{m}").is_dir()
    # v2 trained independently is the reproduction's new model, trained once for both commands
    assert (tmp_path / "runs" / "reproduce_cpu" / "models" / "new.pt").is_file()
    assert r.stdout.count("== training") == 9  # 7 backbones, 2 FCT maps


def _names_only_suite():
    from fct.compat.suite import ChainSuite

    return ChainSuite(REPO / "configs" / "tinyimagenet", v0="v0.yaml", backbone="{v}_{m}.yaml",
                      transformation="{h}.yaml", matrix="matrix_{m}.yaml")


def test_chain_steps_evaluate_each_matrix_once_its_models_exist():
    suite = _names_only_suite()
    names = [s.name for s in suite.steps()]
    assert names == ["chain v0", "chain v1 independent", "chain v2 independent", "chain FCT h01",
                     "chain FCT h12", "matrix independent", "matrix fct",
                     "chain v1 bct", "chain v2 bct", "matrix bct",
                     "chain v1 backward", "chain v2 backward", "matrix backward"]


def test_chain_steps_for_some_methods_keep_the_references():
    suite = _names_only_suite()
    names = [s.name for s in suite.steps(["backward"])]
    assert names == ["chain v0", "chain v1 independent", "chain v2 independent",
                     "chain v1 backward", "chain v2 backward", "matrix backward"]
    assert [s.name for s in suite.steps(["fct"])][3:] == ["chain FCT h01", "chain FCT h12", "matrix fct"]
    with pytest.raises(ValueError, match="bogus"):
        suite.steps(["bogus"])


def test_chain_cpu_unknown_method_is_a_user_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fct.chain_cpu", "--methods", "backward,bogus"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--methods" in r.stderr and "bogus" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["fct.reproduce"], ["fct.regression.quick", "--suite", "tinyimagenet"],
                                     ["fct.chain_cpu"]])
def test_missing_data_is_a_user_error(tmp_path, command):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", *command, "--data-root", str(tmp_path / "nowhere")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_configs_point_at_the_stand_in():
    if not SHARED.is_dir():
        pytest.skip(f"the Tiny-ImageNet stand-in is absent ({SHARED})")
    configs = REPO / "configs" / "tinyimagenet"
    from fct.config.chain import ChainConfig
    from fct.config.interpolation import InterpolationConfig

    kinds = {"backbone": BackboneConfig, "side": BackboneConfig, "transformation": TransformationConfig,
             "eval": EvalConfig, "interpolate": InterpolationConfig, "matrix": ChainConfig}
    for path in sorted(configs.glob("*.yaml")):
        cls = kinds[path.stem.split("_")[0]]
        cfg = load_config(cls, path)
        assert (REPO / cfg.dataset_params.data_root).resolve() == SHARED.resolve()


def _pt_paths(node, key=""):
    """(key, value) of every '.pt' path in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _pt_paths(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _pt_paths(v, key)
    elif isinstance(node, str) and node.endswith(".pt"):
        yield key, node


def test_every_model_a_tinyimagenet_config_reads_is_made_by_one():
    import yaml

    from fct.regression.quick import SUITES

    # the soups' second fine-tuned models come from the fine-tuning configs with --set overrides
    out = SUITES["tinyimagenet"].out
    made = {f"{out.as_posix()}/models/new_ft_{scenario}_s2.pt" for scenario in ("data", "classes")}
    read = {}
    for path in sorted((REPO / "configs" / "tinyimagenet").glob("*.yaml")):
        for key, value in _pt_paths(yaml.safe_load(path.read_text())):
            if key.startswith("output_"):
                assert value not in made, f"{path.name}: {value} is also written by another config"
                made.add(value)
            else:
                read.setdefault(value, path.name)
    missing = {v: name for v, name in read.items() if v not in made}
    assert not missing, f"models read but made by no config: {missing}"
