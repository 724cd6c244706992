"""train_transformation end to end: script + eval, cached == on-the-fly, cache reuse, errors."""

import json
import textwrap

import pytest
import torch

from fct.config import load_config
from fct.config.transformation import TransformationConfig
from fct.errors import UserError
from fct.models import build_backbone, load_model_file, read_model_file, save_model_file
from helpers import run_cli, run_script


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    d = tmp_path_factory.mktemp("backbones")
    for name, dim, seed in (("old", 16, 0), ("new", 24, 1), ("side", 8, 2)):
        torch.manual_seed(seed)
        arch = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": dim, "last_nonlin": True}
        save_model_file(d / f"{name}.pt", build_backbone(**arch), kind="backbone", arch_params=arch)
    return d


def config(tmp_path, backbones, *, arch="MLP_BN_SIDE_PROJECTION", side=False, cache=True, epochs=2, extra="",
           cache_dir=None):
    cache_dir = cache_dir or tmp_path / "cache"
    fastfill = arch.endswith("SIGMA")
    text = textwrap.dedent(f"""\
        old_model_path: {backbones}/old.pt
        new_model_path: {backbones}/new.pt
        {f'side_info_model_path: {backbones}/side.pt' if side else ''}
        arch_params: {{arch: {arch}, old_embedding_dim: 16, new_embedding_dim: 24,
                      {'side_info_dim: 8,' if side else ''} inner_dim: 32}}
        optimizer_params: {{algorithm: adam, lr: 0.001}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 64}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 0}}
        epochs: {epochs}
        seed: 7
        feature_cache: {{enabled: {str(cache).lower()}, views: 2, dir: {cache_dir}}}
        output_transformation_path: {tmp_path}/h.pt
        output_transformed_old_model_path: {tmp_path}/old_transformed.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """)
    if fastfill:
        text += ("objective_params: {discriminative_loss: {name: LabelSmoothing, mu_disc: 1.0}, "
                 "uncertainty_loss: {mu_uncertainty: 0.5}}\n")
    p = tmp_path / "t.yaml"
    p.write_text(text + extra)
    return p



@pytest.mark.slow
def test_script_then_eval_with_transformed_gallery(tmp_path, backbones):
    cfg = config(tmp_path, backbones, arch="MLP_BN_SIDE_PROJECTION_SIGMA", side=True)
    r = run_script("train_transformation.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert read_model_file(tmp_path / "h.pt")["kind"] == "transformation"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and "val_loss" in lines[0]
    # the transformed old model = h(old(x), side(x)), usable as a gallery model
    t = load_model_file(tmp_path / "old_transformed.pt")
    x = torch.randn(3, 3, 8, 8)
    old, side = load_model_file(backbones / "old.pt"), load_model_file(backbones / "side.pt")
    h = load_model_file(tmp_path / "h.pt")
    with torch.no_grad():
        by_hand = h(old(x).embedding, side(x).embedding)
        feat, logvar = t.embed_with_uncertainty(x)
    torch.testing.assert_close(t(x).embedding, by_hand.feature)
    torch.testing.assert_close(logvar, by_hand.log_variance)
    ev = tmp_path / "eval.yaml"
    ev.write_text(textwrap.dedent(f"""\
        query_model_path: {backbones}/new.pt
        gallery_model_path: {tmp_path}/old_transformed.pt
        dataset_params: {{name: digits, num_workers: 0, batch_size: 128}}
        eval_params: {{backfilling: 2, backfilling_list: [random, sigma, distance], backfilling_random_seeds: 2,
                      backfilling_result_path: {tmp_path}/bf.npy}}
        results_path: {tmp_path}/res.json
        """))
    r = run_script("eval.py", "--config", str(ev))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert 0 <= res["top1"] <= 100
    # backfilling with the FastFill head's own uncertainty (sigma order) from the model file
    bf = res["backfilling"]["orderings"]
    assert set(bf) == {"random", "sigma", "distance"}
    assert bf["sigma"]["top1"]["points"][0] == pytest.approx(res["top1"])
    assert (tmp_path / "bf.npy").exists() and (tmp_path / "bf.png").exists()


def _train(cfg_path):
    from fct.training.transformation import train_transformation

    return train_transformation(load_config(TransformationConfig, cfg_path))


def test_cached_and_on_the_fly_agree(tmp_path, backbones):
    """With views >= epochs a cached run sees exactly the on-the-fly inputs, in the same order."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _train(config(tmp_path / "a", backbones, cache=True, epochs=2))
    _train(config(tmp_path / "b", backbones, cache=False, epochs=2))
    a = read_model_file(tmp_path / "a" / "h.pt")["state_dict"]
    b = read_model_file(tmp_path / "b" / "h.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cache_is_reused(tmp_path, backbones, monkeypatch):
    import fct.training.feature_cache as fc

    _train(config(tmp_path, backbones, epochs=1))
    roots = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(roots) == 2  # one folder per model: old, new
    for root in roots:
        assert sorted(p.name for p in root.glob("view_*.done")) == ["view_0.done", "view_1.done"]
    calls: list = []
    original = fc.embed_batch

    def counting(models, *a, **k):
        calls.append(sorted(models))
        return original(models, *a, **k)

    monkeypatch.setattr(fc, "embed_batch", counting)
    (tmp_path / "again").mkdir()
    _train(config(tmp_path / "again", backbones, epochs=1, cache_dir=tmp_path / "cache"))
    # only the dimension probe ran: the views came from disk
    assert len(calls) == 1
    # adding a side-information model computes its features only; old and new come from disk
    calls.clear()
    (tmp_path / "side").mkdir()
    _train(config(tmp_path / "side", backbones, epochs=1, side=True, cache_dir=tmp_path / "cache"))
    assert calls[0] == ["new", "old", "side"] and len(calls) > 1
    assert all(c == ["side"] for c in calls[1:])
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 3


@pytest.mark.slow
def test_dimension_mismatch_is_a_user_error(tmp_path, backbones):
    cfg = config(tmp_path, backbones)
    r = run_cli("train_transformation.py", "--config", str(cfg), "--set", "arch_params.new_embedding_dim=32")
    assert r.returncode == 2 and "new_embedding_dim=32" in r.stderr and "Traceback" not in r.stderr, r.stderr
    cfg.write_text(cfg.read_text().replace(f"{backbones}/old.pt", f"{tmp_path}/missing.pt"))
    with pytest.raises(UserError, match="missing.pt"):
        _train(cfg)


@pytest.mark.parametrize("cache", [True, False])
def test_interrupted_transformation_resumes_to_identical_weights(tmp_path, backbones, killed_after_first_epoch,
                                                                 cache):
    """Killed after epoch 0's checkpoint, the rerun continues at epoch 1 (where h's BatchNorm
    switches to eval mode) and ends with exactly the weights of an uninterrupted run."""
    import fct.training.transformation as tt

    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    shared_cache = tmp_path / "cache"
    tt.train_transformation(load_config(TransformationConfig, config(
        full, backbones, arch="MLP_BN_SIDE_PROJECTION_SIGMA", cache=cache, cache_dir=shared_cache)))
    cfg = load_config(TransformationConfig, config(cut, backbones, arch="MLP_BN_SIDE_PROJECTION_SIGMA",
                                                   cache=cache, cache_dir=shared_cache))
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        tt.train_transformation(cfg)
    assert not (cut / "h.pt").exists()
    tt.train_transformation(cfg)
    a, b = read_model_file(full / "h.pt")["state_dict"], read_model_file(cut / "h.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    epochs = [json.loads(x)["epoch"] for x in (cut / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
