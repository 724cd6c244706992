"""Strict config loading: the reference schema loads unchanged; every user mistake is one clear error."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from fct.config import BackboneConfig, EvalConfig, apply_overrides, from_dict, load_config, load_yaml, to_dict
from fct.errors import ConfigError
from helpers import REPO


REFERENCE_BACKBONE = textwrap.dedent("""\
    arch_params:
      arch: ResNet50
      num_classes: 100 # This is the number of classes for architecture FC layer.
      embedding_dim: 128
      last_nonlin: True
    optimizer_params:
      algorithm: sgd
      lr: 1.024
      weight_decay: 0.000030517578125
      no_bn_decay: False
      momentum: 0.875
      nesterov: False
    dataset_params:
      name: cifar100
      data_root: data_store/cifar-100-python
      num_classes: 50
      num_workers: 20
      batch_size: 1024
    lr_policy_params:
      algorithm: cosine_lr
      warmup_length: 5
      epochs: 100
      lr: 1.024
    epochs: 100
    label_smoothing: 0.1
    output_model_path: checkpoints/cifar100_old.pt
""")

REFERENCE_EVAL = textwrap.dedent("""\
    gallery_model_path: checkpoints/cifar100_old_transformed.pt
    query_model_path: checkpoints/cifar100_new.pt
    eval_params:
      distance_metric: l2
      verbose: True
      compute_map: True
      per_class: False
    dataset_params:
      name: cifar100
      data_root: data_store/cifar-100-python
      num_workers: 20
      batch_size: 1024
""")


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reference_backbone_config_loads(tmp_path):
    cfg = load_config(BackboneConfig, write(tmp_path, REFERENCE_BACKBONE))
    assert cfg.arch_params.arch == "ResNet50" and cfg.arch_params.embedding_dim == 128
    assert cfg.optimizer_params.weight_decay == 2**-15
    assert cfg.dataset_params.num_classes == 50 and cfg.arch_params.num_classes == 100
    assert cfg.lr_policy_params.warmup_length == 5 and cfg.epochs == 100
    assert cfg.run_dir == "runs/cifar100_old"
    # defaults of the extensions
    assert cfg.seed == 0 and cfg.runtime.precision == "auto"


def test_reference_eval_config_loads_and_alias(tmp_path):
    cfg = load_config(EvalConfig, write(tmp_path, REFERENCE_EVAL))
    assert cfg.eval_params.distance_metric == "l2" and cfg.eval_params.compute_map
    alias = REFERENCE_EVAL.replace("distance_metric: l2", "distance_metric_name: cosine")
    assert load_config(EvalConfig, write(tmp_path, alias)).eval_params.distance_metric == "cosine"


def test_repo_configs_all_load(repo):
    from fct.config.chain import ChainConfig
    from fct.config.interpolation import InterpolationConfig
    from fct.config.transformation import TransformationConfig

    from fct.config.embed import EmbedConfig
    from fct.config.probe import ProbeConfig
    from fct.config.wrap import WrapConfig

    kinds = [("embed", EmbedConfig), ("wrap_", WrapConfig), ("probe_", ProbeConfig), ("matrix", ChainConfig), ("transformation", TransformationConfig), ("posthoc", TransformationConfig),
             ("chain_fct_h", TransformationConfig),
             ("interpolate", InterpolationConfig), ("eval", EvalConfig)]
    for path in sorted((repo / "configs").rglob("*.yaml")):
        cls = next((c for key, c in kinds if key in path.name), BackboneConfig)
        load_config(cls, path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(BackboneConfig, write(tmp_path, REFERENCE_BACKBONE))
    again = from_dict(BackboneConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    "edit, fragments",
    [
        # unknown key: names key, file and the closest valid key
        (("optimizer_params:\n", "optimizer_params:\n  lrr: 0.1\n"), ["optimizer_params.lrr", "did you mean", "'lr'"]),
        (("\nepochs: 100\n", "\nepochs: 100\nepoch: 3\n"), ["unknown key 'epoch'", "'epochs'"]),
        # wrong types
        (("  lr: 1.024\n  weight", "  lr: fast\n  weight"), ["optimizer_params.lr", "float"]),
        (("\nepochs: 100\n", "\nepochs: 1.5\n"), ["epochs", "int"]),
        (("  nesterov: False", "  nesterov: 3"), ["nesterov", "bool"]),
        (("  batch_size: 1024", "  batch_size: true"), ["batch_size", "int"]),
        (("  algorithm: sgd", "  algorithm: sgdd"), ["optimizer_params.algorithm", "did you mean 'sgd'"]),
        (("  arch: ResNet50\n", "  arch: [1]\n"), ["arch_params.arch", "str"]),
        # a value given twice that disagrees
        (("  epochs: 100\n  lr", "  epochs: 90\n  lr"), ["lr_policy_params.epochs=90", "epochs=100"]),
        (("  lr: 1.024\n\n", "  lr: 0.5\n"), []),  # placeholder replaced below
        # missing required key
        (("output_model_path: checkpoints/cifar100_old.pt\n", ""), ["missing required key 'output_model_path'"]),
        # value out of range
        (("label_smoothing: 0.1", "label_smoothing: 1.5"), ["label_smoothing"]),
        (("  num_classes: 50", "  num_classes: 500"), ["dataset_params.num_classes=500", "arch_params.num_classes=100"]),
        (("label_smoothing: 0.1", "label_smoothing: 0.1\nruntime: 3"), ["runtime must be a mapping"]),
    ],
)
def test_config_errors(tmp_path, edit, fragments):
    old, new = edit
    if not fragments:  # lr given twice with different values
        text = REFERENCE_BACKBONE.replace("  epochs: 100\n  lr: 1.024", "  epochs: 100\n  lr: 0.5")
        fragments = ["lr_policy_params.lr=0.5", "lr=1.024"]
    else:
        assert old in REFERENCE_BACKBONE, old
        text = REFERENCE_BACKBONE.replace(old, new, 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(BackboneConfig, path)
    msg = str(e.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(BackboneConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(BackboneConfig, write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(BackboneConfig, write(tmp_path, "- 1\n- 2\n"))


def test_alias_disagreement(tmp_path):
    text = REFERENCE_EVAL.replace("distance_metric: l2", "distance_metric: l2\n  distance_metric_name: cosine")
    with pytest.raises(ConfigError, match="distance_metric_name='cosine' disagrees"):
        load_config(EvalConfig, write(tmp_path, text))


def test_eval_needs_both_sides(tmp_path):
    with pytest.raises(ConfigError, match="missing query_model_path"):
        load_config(EvalConfig, write(tmp_path, "gallery_features_path: g.npz\n"))
    with pytest.raises(ConfigError, match="not both"):
        load_config(EvalConfig, write(tmp_path, "query_features_path: q.npz\nquery_model_path: m.pt\n"
                                                 "gallery_features_path: g.npz\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, REFERENCE_BACKBONE)
    cfg = load_config(BackboneConfig, path, ["optimizer_params.lr=0.1", "lr_policy_params.lr=0.1",
                                             "epochs=3", "lr_policy_params.epochs=3", "lr_policy_params.warmup_length=1",
                                             "runtime.channels_last=false", "dataset_params.name=npz"])
    assert cfg.optimizer_params.lr == 0.1 and cfg.epochs == 3
    assert cfg.runtime.channels_last is False and cfg.dataset_params.name == "npz"
    with pytest.raises(ConfigError, match="with --set overrides.*optimizer_params.lrr"):
        load_config(BackboneConfig, path, ["optimizer_params.lrr=0.1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(BackboneConfig, path, ["epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"epochs": 3}, ["epochs.x=1"])


# --------------------------------------------------------------------------- numbers (issue 13 item 9)
def backbone_with(tmp_path, old, new, name="c.yaml"):
    assert old in REFERENCE_BACKBONE, old
    return write(tmp_path, REFERENCE_BACKBONE.replace(old, new, 1), name)


def test_exponent_float_loads_like_decimal(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}
    cfg = load_config(BackboneConfig, backbone_with(tmp_path, "lr: 1.024\n  weight", "lr: 1e-3\n  weight"),
                      ["lr_policy_params.lr=1e-3"])
    same = load_config(BackboneConfig, backbone_with(tmp_path, "lr: 1.024\n  weight", "lr: 0.001\n  weight", "d.yaml"),
                       ["lr_policy_params.lr=0.001"])
    assert cfg.optimizer_params.lr == 0.001 and isinstance(cfg.optimizer_params.lr, float)
    assert cfg.lr_policy_params.lr == 0.001  # Optional[float] too
    assert cfg == same


def test_exponent_float_via_set(tmp_path):
    path = write(tmp_path, REFERENCE_BACKBONE)
    cfg = load_config(BackboneConfig, path, ["optimizer_params.lr=1E-3", "lr_policy_params.lr='1e-3'",
                                             "optimizer_params.weight_decay=5e-4"])
    assert cfg.optimizer_params.lr == 0.001 and cfg.lr_policy_params.lr == 0.001
    assert cfg.optimizer_params.weight_decay == 5e-4


@pytest.mark.parametrize("key", ["optimizer_params.lr", "lr_policy_params.lr",
                                 "optimizer_params.weight_decay", "label_smoothing",
                                 "bct_params.influence_weight"])
@pytest.mark.parametrize("value, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"), ("nan", "nan"),
                                          ("inf", "inf"), ("'.NaN'", None), ("1e400", "inf")])
def test_non_finite_float_refused(tmp_path, key, value, shown):
    path = write(tmp_path, REFERENCE_BACKBONE + "bct_params: {old_model_path: old.pt}\n")
    with pytest.raises(ConfigError) as e:
        load_config(BackboneConfig, path, [f"{key}={value}"])
    msg = str(e.value)
    expected = f"{key} must be a finite number, got {shown}" if shown else f"{key} must be float"
    assert expected in msg, msg
    assert "\n" not in msg


def test_non_finite_float_refused_in_yaml(tmp_path):
    path = backbone_with(tmp_path, "  momentum: 0.875", "  momentum: .inf")
    msg = r"c\.yaml: optimizer_params\.momentum must be a finite number, got inf"
    with pytest.raises(ConfigError, match=msg):
        load_config(BackboneConfig, path)


@pytest.mark.parametrize("value, fragment", [("abc", "must be float, got 'abc'"),
                                             ("true", "must be float, got True"),
                                             ("1e-3x", "must be float, got '1e-3x'")])
def test_non_number_for_float_refused(tmp_path, value, fragment):
    with pytest.raises(ConfigError, match=f"optimizer_params.lr {fragment}"):
        load_config(BackboneConfig, write(tmp_path, REFERENCE_BACKBONE), [f"optimizer_params.lr={value}"])


def test_numeric_string_not_taken_for_int(tmp_path):
    # only float fields take numeric strings: '1e2' epochs stays a type error, not 100
    with pytest.raises(ConfigError, match="epochs must be int, got '1e2'"):
        load_config(BackboneConfig, write(tmp_path, REFERENCE_BACKBONE),
                    ["epochs=1e2", "lr_policy_params.epochs=1e2"])


# --------------------------------------------------------------------------- YAML text (issue 13 item 10)
def test_duplicate_key_top_level(tmp_path):
    path = write(tmp_path, REFERENCE_BACKBONE + "epochs: 5\n")
    first = REFERENCE_BACKBONE.splitlines().index("epochs: 100") + 1
    last = len(REFERENCE_BACKBONE.splitlines()) + 1
    with pytest.raises(ConfigError) as e:
        load_config(BackboneConfig, path)
    assert str(e.value) == f"{path}: key 'epochs' is written twice (lines {first} and {last})"


def test_duplicate_key_nested(tmp_path):
    path = backbone_with(tmp_path, "  nesterov: False\n", "  nesterov: False\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(BackboneConfig, path)
    assert str(e.value) == f"{path}: key 'lr' is written twice (lines 8 and 13)"
    # inside a list item, and in flow style on one line
    text = "a:\n  - {k: 1, k: 2}\n"
    with pytest.raises(ConfigError, match=r"key 'k' is written twice \(lines 2 and 2\)"):
        load_yaml(write(tmp_path, text))


def test_yaml_merge_key_may_override(tmp_path):
    data = load_yaml(write(tmp_path, "base: &b {lr: 0.1, momentum: 0.9}\nopt:\n  <<: *b\n  lr: 0.2\n"))
    assert data["opt"] == {"lr": 0.2, "momentum": 0.9}


@pytest.mark.parametrize("text, where", [
    ("a: 1\n b: 2\n", "line 2, column 3: mapping values are not allowed here"),
    ("a: [1, 2\n", "line 2, column 1: expected ',' or ']'"),
    ("a: 1\nb: 'open\n",
     "line 3, column 1: found unexpected end of stream (while scanning a quoted scalar at line 2"),
])
def test_yaml_syntax_error_names_line_and_column(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not valid YAML at {where}"), msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- through a real entry script
def run_train_backbone(tmp_path, text, *sets):
    """Run ``train_backbone.py --config`` on ``text`` as a user would; expect one ``error:`` line, exit 2."""
    cfg = write(tmp_path, text, "config.yaml")
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "train_backbone.py", "--config", str(cfg), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return cfg, errors[0]


@pytest.mark.slow
def test_script_refuses_infinite_lr_from_set(tmp_path):
    # before the fix .inf was accepted and the run failed later on a non-finite loss
    cfg, line = run_train_backbone(tmp_path, REFERENCE_BACKBONE, "optimizer_params.lr=.inf")
    expected = f"{cfg} (with --set overrides): optimizer_params.lr must be a finite number, got inf"
    assert line == f"error: {expected}"


@pytest.mark.slow
def test_script_refuses_duplicate_key(tmp_path):
    text = REFERENCE_BACKBONE.replace("  nesterov: False\n", "  nesterov: False\n  lr: 0.5\n")
    cfg, line = run_train_backbone(tmp_path, text)
    assert line == f"error: {cfg}: key 'lr' is written twice (lines 8 and 13)"


def test_non_finite_refused_in_float_lists():
    from fct.config import ViewAugParams

    with pytest.raises(ConfigError, match=r"x: crop_scale\[1\] must be a finite number, got inf"):
        from_dict(ViewAugParams, {"crop_scale": [0.2, float("inf")]}, source="x")
    assert from_dict(ViewAugParams, {"crop_scale": ["2e-1", 1]}, source="x").crop_scale == (0.2, 1.0)
