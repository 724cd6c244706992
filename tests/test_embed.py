"""python -m fct.embed: stored embeddings of a split (the features files of eval.py, compat.py and
train_transformation.py), their ids through subsets, the no-op rerun; a chain matrix from stored
embeddings; model files that are the same bytes every time they are written."""

from __future__ import annotations

import hashlib
import json
import textwrap

import numpy as np
import pytest
import torch

from helpers import one_error_line, run_cli, run_script, write_backbones

from fct.config import DatasetParams, load_config
from fct.config.embed import EmbedConfig
from fct.data import build_dataset
from fct.data.datasets import take_fraction
from fct.embed import embed, split_ids
from fct.errors import ConfigError, UserError
from fct.io import atomic_torch_save
from fct.retrieval.embeddings import model_embeddings, read_feature_file
from fct.runtime import make_runtime
from fct.config import RuntimeParams


def embed_config(tmp_path, model, split="val", out="f.npz", classes="6", extra="") -> EmbedConfig:
    path = tmp_path / "embed.yaml"
    path.write_text(textwrap.dedent(f"""\
        model_path: {model}
        split: {split}
        output_path: {tmp_path / out}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 100, train_fraction: 0.1, num_classes: {classes}}}
        runtime: {{progress: false}}
        """) + extra)
    return load_config(EmbedConfig, path)


def test_split_ids_follow_class_and_fraction_subsets():
    full = build_dataset("digits", "", "train", augment=False, num_classes=None)
    some = build_dataset("digits", "", "train", augment=False, num_classes=4)
    sub = take_fraction(some, 0.2, 0)
    ids = split_ids(sub)
    assert len(ids) == len(sub) and len(np.unique(ids)) == len(ids)
    # every id names the same image in the whole split: same label, same pixels
    row = {int(i): k for k, i in enumerate(split_ids(full))}
    np.testing.assert_array_equal(full.labels[[row[int(i)] for i in ids]], sub.labels)
    for k in (0, len(sub) // 2, len(sub) - 1):
        torch.testing.assert_close(full[row[int(ids[k])]][0], sub[k][0])


def test_embed_writes_the_models_features_and_reruns_as_a_no_op(tmp_path):
    models = write_backbones(tmp_path / "m")
    cfg = embed_config(tmp_path, models / "old.pt")
    record = embed(cfg)
    f = read_feature_file(cfg.output_path)
    want = model_embeddings(str(models / "old.pt"), DatasetParams(name="digits", num_classes=6, num_workers=0),
                            make_runtime(RuntimeParams(progress=False)))
    keep = want.labels < 6
    np.testing.assert_allclose(f.features, want.features[keep].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f.labels, want.labels[keep].numpy())
    assert f.features.dtype == np.float32 and f.ids is not None and record["rows"] == len(f.labels)
    meta = json.loads(str(np.load(cfg.output_path)["meta"]))
    assert meta["split"] == "val" and meta["train_fraction"] is None and meta["num_classes"] == 6

    before = cfg_bytes = (tmp_path / "f.npz").read_bytes()
    assert embed(cfg) == {"path": cfg.output_path, "up_to_date": True}
    assert (tmp_path / "f.npz").read_bytes() == before
    # another model under the same path: rewritten
    (models / "old.pt").write_bytes((models / "new.pt").read_bytes())
    embed(cfg)
    assert read_feature_file(cfg.output_path).features.shape[1] == 24 and cfg_bytes != (tmp_path / "f.npz").read_bytes()

    # the training split takes the train_fraction subset, ids pair it with the full split
    train = embed_config(tmp_path, models / "new.pt", split="train", out="t.npz")
    embed(train)
    t = read_feature_file(train.output_path)
    assert len(t.labels) == len(take_fraction(build_dataset("digits", "", "train", augment=False, num_classes=6),
                                              0.1, 0))
    assert json.loads(str(np.load(train.output_path)["meta"]))["train_fraction"] == [0.1, 0]


def test_embed_user_errors(tmp_path):
    models = write_backbones(tmp_path / "m")
    with pytest.raises(ConfigError, match="output_path must be a .npz features file or a folder"):
        embed_config(tmp_path, models / "old.pt", out="f.npy")
    with pytest.raises(ConfigError, match="shard_size must be >= 1"):
        embed_config(tmp_path, models / "old.pt", out="shards", extra="shard_size: 0\n")
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"model_path: {tmp_path}/none.pt\noutput_path: {tmp_path}/f.npz\n"
                   "dataset_params: {name: digits, num_workers: 0}\n")
    r = run_cli("-m", "fct.embed", "--config", str(cfg))
    assert r.returncode == 2 and "none.pt does not exist" in one_error_line(r.stderr)
    r = run_cli("-m", "fct.embed", "--config", str(cfg), "--set", f"output_path={models}/old.pt")
    assert r.returncode == 2 and "output_path" in one_error_line(r.stderr)


def test_chain_matrix_from_stored_embeddings_equals_the_models(tmp_path):
    from fct.compat.chain import evaluate_chain
    from fct.config import ChainConfig

    models = write_backbones(tmp_path / "m", (("v0", 16, 0), ("v1", 16, 1)))
    for v in ("v0", "v1"):
        embed(embed_config(tmp_path, models / f"{v}.pt", out=f"{v}.npz", classes="null"))

    def chain(stored: bool, out: str, v0_features: str = "v0.npz"):
        path = tmp_path / f"{out}.yaml"
        versions = []
        for v, parent in (("v0", None), ("v1", "v0")):
            entry = {"id": v, "model_path": str(models / f"{v}.pt"), "reference_model_path": str(models / f"{v}.pt")}
            if parent:
                entry.update(parent=parent, edges=[{"source": "v0", "target": "v1", "kind": "identity"}])
            if stored:
                entry["features_path"] = str(tmp_path / (v0_features if v == "v0" else f"{v}.npz"))
            versions.append(entry)
        path.write_text(json.dumps({
            "versions": versions, "projection": False, "runtime": {"progress": False},
            "dataset_params": {"name": "digits", "num_workers": 0, "batch_size": 100},
            "registry_dir": str(tmp_path / f"{out}_reg"), "output_dir": str(tmp_path / out)}))
        return evaluate_chain(load_config(ChainConfig, path))

    from_models, from_files = chain(False, "models"), chain(True, "files")
    for m in ("top1", "top5", "mAP"):
        assert from_files[m]["matrix"] == from_models[m]["matrix"]
    wide = write_backbones(tmp_path / "w", (("w", 24, 0),))
    embed(embed_config(tmp_path, wide / "w.pt", out="w.npz", classes="null"))
    with pytest.raises(UserError, match=r"version v0: features_path .*w.npz holds 24-d embeddings, its model .*v0.pt "
                                        r"gives 16-d"):
        chain(True, "bad", v0_features="w.npz")


def test_model_files_are_the_same_bytes_every_time(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "meta": {"a": 1}}
    digests = set()
    for name in ("a.pt", "b.pt"):
        atomic_torch_save(state, tmp_path / name)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_sharded_output_equals_one_file_and_resumes_shard_by_shard(tmp_path):
    models = write_backbones(tmp_path / "m")
    one = embed_config(tmp_path, models / "old.pt", out="f.npz", classes="null")
    embed(one)
    sharded = embed_config(tmp_path, models / "old.pt", out="shards", classes="null", extra="shard_size: 100\n")
    record = embed(sharded)
    root = tmp_path / "shards"
    assert sorted(p.name for p in root.glob("features-*.npy")) == [f"features-0000{k}.npy" for k in range(4)]
    a, b = read_feature_file(str(tmp_path / "f.npz")), read_feature_file(str(root))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ids, b.ids)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["rows"] == record["rows"] == 359 and manifest["shards"] == 4 and manifest["dim"] == 16

    # a kill during shard 2: its files half there, no marker, no manifest; the rerun redoes shard 2 only
    (root / "manifest.json").unlink()
    (root / "shard-00002.done").unlink()
    (root / "features-00002.npy").write_bytes(b"partial")
    kept = {k: (root / f"features-0000{k}.npy").stat().st_mtime_ns for k in (0, 1, 3)}
    with pytest.raises(UserError, match="not a complete sharded features folder"):
        read_feature_file(str(root))
    record = embed(sharded)
    assert {k: (root / f"features-0000{k}.npy").stat().st_mtime_ns for k in (0, 1, 3)} == kept
    np.testing.assert_array_equal(read_feature_file(str(root)).features, a.features)
    assert embed(sharded)["up_to_date"]

    # the folder holds another model's embeddings: refused, never mixed
    (root / "manifest.json").unlink()
    other = embed_config(tmp_path, models / "new.pt", out="shards", classes="null", extra="shard_size: 100\n")
    with pytest.raises(UserError, match="holds embeddings made otherwise"):
        embed(other)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match="a folder with other files in it"):
        embed(embed_config(tmp_path, models / "old.pt", out="busy", classes="null"))


@pytest.mark.slow
def test_sharded_embedding_under_torchrun_equals_one_process(tmp_path):
    from helpers import free_port

    models = write_backbones(tmp_path / "m")
    embed(embed_config(tmp_path, models / "old.pt", out="f.npz", classes="null"))
    cfg = tmp_path / "embed.yaml"  # written by embed_config: point it at a folder with small shards
    cfg.write_text(cfg.read_text().replace(f"{tmp_path / 'f.npz'}", f"{tmp_path / 'dist'}") + "shard_size: 50\n")
    r = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "-m", "fct.embed", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_feature_file(str(tmp_path / "f.npz")), read_feature_file(str(tmp_path / "dist"))
    np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.ids, a.ids)
    assert len(list((tmp_path / "dist").glob("shard-*.done"))) == 8  # 359 rows in shards of 50
