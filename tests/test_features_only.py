"""Training h on stored embeddings (no model run) and evaluating h on stored embeddings.

The equality setting: a model-based run with ``feature_cache.views: 1`` trains every epoch on
view 0 of the cache (one seeded augmentation of each training image) and validates on the
un-augmented val split. Writing exactly those arrays (cache view 0; the validation batches the
run computes) to features files and training on them gives h the same inputs, in the same
order (both go through CachedBatches with the same seed), so the weights must be equal.
"""

import json
import textwrap

import numpy as np
import pytest
import torch

from fct.config import EvalConfig, load_config
from fct.config.transformation import TransformationConfig
from fct.errors import ConfigError, UserError
from fct.models import load_model_file, read_model_file
from fct.retrieval.embeddings import FeatureFile, pair_feature_files, read_feature_file
from helpers import one_error_line, run_cli, run_script, write_backbones

SPECS = (("old", 16, 0), ("new", 24, 1), ("side", 8, 2))


def _save(path, features, labels, ids=None):
    arrays = {"features": features, "labels": labels}
    if ids is not None:
        arrays["ids"] = ids
    np.savez(path, **arrays)
    return path


def _train(text: str, tmp_path):
    from fct.training.transformation import train_transformation

    p = tmp_path / "t.yaml"
    p.write_text(text)
    return train_transformation(load_config(TransformationConfig, p))


def _common(tmp_path, *, fastfill=True, side=True, views=1, epochs=2) -> str:
    text = textwrap.dedent(f"""\
        arch_params: {{arch: {'MLP_BN_SIDE_PROJECTION_SIGMA' if fastfill else 'MLP_BN_SIDE_PROJECTION'},
                      old_embedding_dim: 16, new_embedding_dim: 24, {'side_info_dim: 8,' if side else ''}
                      inner_dim: 32}}
        optimizer_params: {{algorithm: adam, lr: 0.001}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 64}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 0}}
        epochs: {epochs}
        seed: 7
        feature_cache: {{enabled: true, views: {views}, dir: {tmp_path}/cache}}
        output_transformation_path: {tmp_path}/h.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """)
    if fastfill:
        text += ("objective_params: {discriminative_loss: {name: LabelSmoothing, mu_disc: 1.0}, "
                 "uncertainty_loss: {mu_uncertainty: 0.5}}\n")
    return text


def _metrics(folder):
    return [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """h trained from the models (cache of one view) and from the same features stored in files."""
    import fct.training.transformation as tt
    from fct.data import build_dataset
    from fct.io import file_sha256
    from fct.runtime import make_runtime
    from fct.config.common import RuntimeParams

    root = tmp_path_factory.mktemp("features_only")
    models = write_backbones(root / "models", SPECS)
    a, b, feats = root / "models_run", root / "stored_run", root / "feats"
    for d in (a, b, feats):
        d.mkdir()
    _train(_common(a) + textwrap.dedent(f"""\
        old_model_path: {models}/old.pt
        new_model_path: {models}/new.pt
        side_info_model_path: {models}/side.pt
        output_transformed_old_model_path: {a}/old_transformed.pt
        """), a)
    # the run's inputs, written as features files: cache view 0 (train) and the val batches
    by_digest = {json.loads((d / "key.json").read_text())["model"]: d for d in (a / "cache").iterdir()}
    rt = make_runtime(RuntimeParams(progress=False))
    val_set = build_dataset("digits", "", "val", augment=False)
    frozen = {name: tt.load_frozen(str(models / f"{name}.pt"), rt) for name, _, _ in SPECS}
    val = tt._ValBatches(val_set, frozen, rt, 64, 0)
    val_labels = torch.cat([y for _, y in val.batches]).numpy()
    for name, _, _ in SPECS:
        cache = by_digest[file_sha256(models / f"{name}.pt")]
        _save(feats / f"{name}.npz", np.load(cache / "features.npy")[0], np.load(cache / "labels.npy"))
        _save(feats / f"val_{name}.npz", torch.cat([f[name] for f, _ in val.batches]).numpy(), val_labels)
    _train(_common(b) + textwrap.dedent(f"""\
        new_model_path: {models}/new.pt
        old_model_path: {models}/old.pt
        side_info_model_path: {models}/side.pt
        output_transformed_old_model_path: {b}/old_transformed.pt
        old_features_path: {feats}/old.npz
        new_features_path: {feats}/new.npz
        side_info_features_path: {feats}/side.npz
        val_old_features_path: {feats}/val_old.npz
        val_new_features_path: {feats}/val_new.npz
        val_side_info_features_path: {feats}/val_side.npz
        """), b)
    return {"models": models, "a": a, "b": b, "feats": feats}


def test_stored_embeddings_train_exactly_like_models(trained):
    """FastFill + side-information + discriminative loss (classifier from new_model_path): same weights."""
    a = read_model_file(trained["a"] / "h.pt")["state_dict"]
    b = read_model_file(trained["b"] / "h.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _metrics(trained["a"]), _metrics(trained["b"])
    assert [m["epoch"] for m in mb] == [0, 1]
    for x, y in zip(ma, mb):
        assert x["train_loss"] == y["train_loss"]
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-6)
        assert x["val_cosine"] == pytest.approx(y["val_cosine"], rel=1e-6)
    # old_model_path given: the transformed old model is written too, and equals the model run's
    ta, tb = read_model_file(trained["a"] / "old_transformed.pt"), read_model_file(trained["b"] / "old_transformed.pt")
    for k in ta["state_dict"]:
        assert torch.equal(ta["state_dict"][k], tb["state_dict"][k]), k


def _eval_features(trained, tmp_path):
    """Old, side and new embeddings of the evaluation split, computed by the models as eval.py does."""
    from fct.config.common import DatasetParams, RuntimeParams
    from fct.retrieval.embeddings import model_embeddings
    from fct.runtime import make_runtime

    rt = make_runtime(RuntimeParams(progress=False))
    dp = DatasetParams(name="digits", num_workers=0, batch_size=128)
    out = {}
    for name in ("old", "side", "new"):
        e = model_embeddings(str(trained["models"] / f"{name}.pt"), dp, rt)
        out[name] = _save(tmp_path / f"eval_{name}.npz", e.features.numpy(), e.labels.numpy(),
                          ids=np.arange(len(e.labels)) * 3 + 1)
    return out


def test_eval_of_h_on_stored_embeddings_equals_transformed_model(trained, tmp_path):
    """h applied to stored old/side embeddings == the transformed old model on the images; the
    FastFill sigma order comes from h's log-variance without any image model."""
    from fct.evaluate import evaluate

    f = _eval_features(trained, tmp_path)
    # the side file in another row order: paired with the old file by ids
    side = read_feature_file(str(f["side"]))
    perm = np.random.default_rng(0).permutation(len(side.labels))
    _save(f["side"], side.features[perm], side.labels[perm], side.ids[perm])
    ep = ("eval_params: {backfilling: 2, backfilling_list: [random, sigma, distance], backfilling_random_seeds: 2, "
          "verbose: false}\n")
    by_model = tmp_path / "m.yaml"
    by_model.write_text(f"query_model_path: {trained['models']}/new.pt\n"
                        f"gallery_model_path: {trained['b']}/old_transformed.pt\n"
                        "dataset_params: {name: digits, num_workers: 0, batch_size: 128}\n"
                        "runtime: {progress: false}\n" + ep)
    by_features = tmp_path / "f.yaml"
    by_features.write_text(f"query_features_path: {f['new']}\ngallery_features_path: {f['old']}\n"
                           f"gallery_side_info_features_path: {f['side']}\n"
                           f"gallery_transformation_path: {trained['b']}/h.pt\n"
                           "runtime: {progress: false}\n"
                           + ep.replace("verbose: false", "verbose: false, leave_one_out: true"))
    rm = evaluate(load_config(EvalConfig, by_model))
    rf = evaluate(load_config(EvalConfig, by_features))
    for key in ("top1", "top5", "mAP"):
        assert rf[key] == pytest.approx(rm[key], abs=1e-4), key
    om, of = rm["backfilling"]["orderings"], rf["backfilling"]["orderings"]
    assert set(of) == {"random", "sigma", "distance"}
    for name in om:
        np.testing.assert_allclose(of[name]["top1"]["points"], om[name]["top1"]["points"], atol=1e-4)
    assert of["sigma"]["top1"]["points"][0] == pytest.approx(rf["top1"])


def test_eval_transformation_needs_its_side_input(trained, tmp_path):
    from fct.evaluate import evaluate

    f = _eval_features(trained, tmp_path)
    cfg = tmp_path / "f.yaml"
    cfg.write_text(f"query_features_path: {f['new']}\ngallery_features_path: {f['old']}\n"
                   f"gallery_transformation_path: {trained['b']}/h.pt\n")
    with pytest.raises(UserError, match="gallery_side_info_features_path"):
        evaluate(load_config(EvalConfig, cfg))
    with pytest.raises(ConfigError, match="gallery_transformation_path"):
        cfg.write_text(f"query_features_path: {f['new']}\ngallery_features_path: {f['old']}\n"
                       f"gallery_side_info_features_path: {f['side']}\n")
        load_config(EvalConfig, cfg)


# -- pairing of stored embeddings -------------------------------------------------------------------------

def _file(path, n=6, d=4, ids=None, labels=None, dtype=np.float32):
    rng = np.random.default_rng(len(path))
    return FeatureFile(path, rng.standard_normal((n, d)).astype(dtype),
                       np.arange(n) % 3 if labels is None else labels, ids)


def test_rows_are_paired_by_ids():
    a = _file("a.npz", ids=np.array([10, 11, 12, 13, 14, 15]), labels=np.array([0, 1, 2, 0, 1, 2]))
    perm = np.array([3, 0, 5, 1, 4, 2])
    b = FeatureFile("b.npz", a.features[perm] * 2, a.labels[perm], a.ids[perm])
    pa, pb = pair_feature_files([a, b])
    np.testing.assert_array_equal(pb.ids, a.ids)
    np.testing.assert_array_equal(pb.features, a.features * 2)
    np.testing.assert_array_equal(pb.labels, a.labels)
    # string ids pair the same way
    sa = FeatureFile("a.npz", a.features, a.labels, a.ids.astype(str))
    sb = FeatureFile("b.npz", b.features, b.labels, b.ids.astype(str))
    np.testing.assert_array_equal(pair_feature_files([sa, sb])[1].features, a.features * 2)


def test_without_ids_everywhere_rows_pair_by_position():
    a = _file("a.npz", ids=np.arange(6))
    b = FeatureFile("b.npz", a.features[::-1].copy(), a.labels, None)
    np.testing.assert_array_equal(pair_feature_files([a, b])[1].features, a.features[::-1])


@pytest.mark.parametrize("case, match", [
    ("ids", r"a\.npz and b\.npz: the ids differ \(1 of a\.npz's ids are not in b\.npz, e\.g\. 5\)"),
    ("count", r"a\.npz and b\.npz: 6 vs 5 rows"),
    ("dtype", r"a\.npz and b\.npz: features are float32 vs float16"),
    ("labels", r"a\.npz and b\.npz: labels differ at 1 of 6 rows paired by ids \(first at row 2"),
    ("id_kind", r"a\.npz and b\.npz: ids are int64 vs <U\d+"),
])
def test_pairing_mismatch_names_both_files(case, match):
    a = _file("a.npz", ids=np.arange(6))
    b = {
        "ids": _file("b.npz", ids=np.array([0, 1, 2, 3, 4, 9])),
        "count": _file("b.npz", n=5, ids=np.arange(5), labels=np.arange(5) % 3),
        "dtype": _file("b.npz", ids=np.arange(6), dtype=np.float16),
        "labels": _file("b.npz", ids=np.arange(6), labels=np.array([0, 1, 0, 0, 1, 2])),
        "id_kind": _file("b.npz", ids=np.arange(6).astype(str)),
    }[case]
    with pytest.raises(UserError, match=match):
        pair_feature_files([a, b])


def test_duplicate_ids_are_refused(tmp_path):
    p = _save(tmp_path / "d.npz", np.zeros((3, 2), np.float32), np.zeros(3, np.int64), np.array([1, 1, 2]))
    with pytest.raises(UserError, match="d.npz: 'ids' holds duplicates"):
        read_feature_file(str(p))


# -- features-only training without any model ----------------------------------------------------------

def _random_features(folder, n=160, n_val=64, dims=(("old", 16), ("new", 24)), ids=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for split, m in (("", n), ("val_", n_val)):
        labels = rng.integers(0, 5, m)
        for name, d in dims:
            _save(folder / f"{split}{name}.npz", rng.standard_normal((m, d)).astype(np.float32), labels,
                  np.arange(m) if ids else None)
            key = {"old": "old", "new": "new", "side": "side_info"}[name]
            keys.append(f"{split}{key}_features_path: {folder}/{split}{name}.npz")
    return "\n".join(keys) + "\n"


def _plain(tmp_path, epochs=2):
    return _common(tmp_path, fastfill=False, side=False, epochs=epochs)


@pytest.mark.parametrize("text, match", [
    ("old_features_path: o.npz\nval_old_features_path: v.npz\n", "missing new_features_path"),
    ("old_features_path: o.npz\nnew_features_path: n.npz\nval_old_features_path: v.npz\n",
     "missing val_new_features_path"),
    ("", r"missing old_model_path \(or old_features_path and val_old_features_path"),
    ("old_features_path: o.npz\nnew_features_path: n.npz\nval_old_features_path: v.npz\n"
     "val_new_features_path: w.npz\noutput_transformed_old_model_path: t.pt\n",
     "output_transformed_old_model_path needs old_model_path"),
    ("old_features_path: o.npz\nnew_features_path: n.npz\nval_old_features_path: v.npz\n"
     "val_new_features_path: w.npz\nside_info_features_path: s.npz\n",
     "side_info_features_path is given but val_side_info_features_path is not"),
    ("old_features_path: o.npz\nnew_features_path: n.npz\nval_old_features_path: v.npz\n"
     "val_new_features_path: w.npz\nold_model_path: old.pt\noutput_transformed_old_model_path: t.pt\n"
     "side_info_model_path: side.pt\n", "side_info_model_path is given but side_info_features_path is not"),
])
def test_sources_are_checked_at_load(tmp_path, text, match):
    p = tmp_path / "t.yaml"
    p.write_text(_plain(tmp_path) + text)
    with pytest.raises(ConfigError, match=match):
        load_config(TransformationConfig, p)


def test_discriminative_loss_without_new_model_is_refused(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(_common(tmp_path, side=False) + _random_features(tmp_path / "f"))
    with pytest.raises(ConfigError, match="discriminative_loss needs the new model's classifier: give new_model_path"):
        load_config(TransformationConfig, p)


def test_dimension_of_a_stored_file_is_checked(tmp_path):
    text = _plain(tmp_path) + _random_features(tmp_path / "f", dims=(("old", 12), ("new", 24)))
    with pytest.raises(UserError, match=r"old\.npz gives 12-d embeddings but arch_params\.old_embedding_dim=16"):
        _train(text, tmp_path)


def test_stored_run_resumes_to_identical_weights(tmp_path, killed_after_first_epoch):
    import fct.training.transformation as tt

    feats = _random_features(tmp_path / "f")
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    _train(_plain(full) + feats, full)
    (cut / "t.yaml").write_text(_plain(cut) + feats)
    cfg = load_config(TransformationConfig, cut / "t.yaml")
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        tt.train_transformation(cfg)
    tt.train_transformation(cfg)
    a, b = read_model_file(full / "h.pt")["state_dict"], read_model_file(cut / "h.pt")["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["epoch"] for m in _metrics(cut)] == [0, 1]
    assert not (tmp_path / "full" / "cache").exists()  # stored embeddings are never cached


@pytest.mark.slow
def test_script_trains_and_evaluates_without_any_model(tmp_path):
    feats = _random_features(tmp_path / "f", dims=(("old", 16), ("new", 24), ("side", 8)))
    cfg = tmp_path / "t.yaml"
    cfg.write_text(_common(tmp_path, fastfill=False, side=True).replace(
        "arch: MLP_BN_SIDE_PROJECTION,", "arch: MLP_BN_SIDE_PROJECTION_SIGMA,")
        + "objective_params: {uncertainty_loss: {mu_uncertainty: 0.5}}\n" + feats)
    r = run_script("train_transformation.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "only h is written" in r.stdout
    assert read_model_file(tmp_path / "h.pt")["kind"] == "transformation"
    assert [m["epoch"] for m in _metrics(tmp_path)] == [0, 1]
    h = load_model_file(tmp_path / "h.pt")
    assert h.has_uncertainty
    ev = tmp_path / "eval.yaml"
    ev.write_text(textwrap.dedent(f"""\
        query_features_path: {tmp_path}/f/val_new.npz
        gallery_features_path: {tmp_path}/f/val_old.npz
        gallery_side_info_features_path: {tmp_path}/f/val_side.npz
        gallery_transformation_path: {tmp_path}/h.pt
        eval_params: {{leave_one_out: true, backfilling: 1, backfilling_list: [sigma]}}
        results_path: {tmp_path}/res.json
        runtime: {{progress: false}}
        """))
    r = run_script("eval.py", "--config", str(ev))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["case"]["gallery"] == f"{tmp_path}/h.pt({tmp_path}/f/val_old.npz)"
    assert "sigma" in res["backfilling"]["orderings"]
    # a count mismatch: exit 2, one line naming both files
    np.savez(tmp_path / "f" / "new.npz", features=np.zeros((5, 24), np.float32), labels=np.zeros(5, np.int64),
             ids=np.arange(5))
    (tmp_path / "run").rename(tmp_path / "run_done")
    r = run_cli("train_transformation.py", "--config", str(cfg))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"{tmp_path}/f/old.npz and {tmp_path}/f/new.npz: 160 vs 5 rows" in line, line
