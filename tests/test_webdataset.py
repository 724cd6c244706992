"""WebDataset shards: prepare_dataset.py writing them, the stream's epochs (every sample once,
seeded, resumable, the same augmentations as the array sets), training to the same weights as the
npz set, two-process sharding, and the user errors. All on tiny arrays built in tmp_path."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from fct.config import BackboneConfig, load_config
from fct.config.common import DatasetParams
from fct.data import arrays, build_dataset, dataset_info, prepare, webdataset
from fct.data.webdataset import epoch_segments, iter_shard
from fct.errors import ConfigError, UserError
from fct.training.loaders import SeededDataset, StreamBatches, eval_loader, train_loader
from helpers import REPO, free_port, one_error_line, run_script

SIZE = 8


@pytest.fixture(autouse=True)
def stats_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("fct-cache")
    monkeypatch.setenv("FCT_CACHE_DIR", str(folder))
    monkeypatch.setattr(arrays, "_MEMO", {})
    return folder


def write_npz(root: Path, n_train: int = 48, n_val: int = 13, classes: int = 5, seed: int = 2) -> Path:
    """train.npz / val.npz of random 8x8 images; ``classes`` None gives every sample its own label."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        labels = np.arange(n, dtype=np.int64) % (classes or max(n_train, n_val))
        np.savez(root / f"{split}.npz", images=images, labels=labels)
    return root


def shards_of(tmp_path: Path, shard_size: int = 10, **npz) -> tuple[Path, Path]:
    src = write_npz(tmp_path / "npz", **npz)
    out = tmp_path / "wds"
    prepare.prepare_webdataset("npz", src, out, shard_size=shard_size)
    return src, out


def options(**kw) -> DatasetParams:
    return DatasetParams(name="webdataset", **kw)


def epoch_labels(batches, epoch: int) -> list[int]:
    batches.set_epoch(epoch)
    return [int(v) for _, y in batches for v in y]


# --------------------------------------------------------------------------- writing
def test_prepare_writes_shards_and_index(tmp_path: Path) -> None:
    src, out = shards_of(tmp_path, shard_size=10)
    index = json.loads((out / "webdataset.json").read_text())
    assert [s["url"] for s in index["splits"]["train"]["shards"]] == [f"train-{k:06d}.tar" for k in range(5)]
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [10, 10, 10, 10, 8]
    assert index["splits"]["val"]["num_samples"] == 13
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # renamed into place, nothing left over
    # Pixels, labels and ids as in the source; mean/std and augmentation recipe as the npz set's.
    images, labels = arrays.load_arrays(src / "train.npz")
    seen = []
    for k in range(5):
        for _, fields in iter_shard(str(out / f"train-{k:06d}.tar")):
            raw = webdataset.parse_sample("x", "k", fields)
            assert np.array_equal(webdataset.decode_array(raw), images[raw.id]) and raw.label == labels[raw.id]
            seen.append(raw.id)
    assert seen == list(range(48))
    info, ref = dataset_info("webdataset", str(out)), dataset_info("npz", str(src))
    assert (info.num_classes, info.image_size, info.mean, info.std) == (ref.num_classes, ref.image_size, ref.mean,
                                                                        ref.std)
    assert index["transform"] == {"kind": "array", "pad": 1, "flip": True}
    # A rerun with bigger shards replaces them and leaves no stale shard behind.
    prepare.prepare_webdataset("npz", src, out, shard_size=30, image_format="npy")
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    val = build_dataset("webdataset", str(out), "val", augment=False)
    ref_val = build_dataset("npz", str(src), "val", augment=False)
    got = list(val)
    assert len(got) == len(val) == 13
    for i, (x, y) in enumerate(got):  # one worker, shards in order: the npz order
        assert torch.equal(x, ref_val[i][0]) and y == ref_val[i][1]


def test_prepare_digits_cli_and_fraction(tmp_path: Path) -> None:
    prepare.main(["digits", "--format", "webdataset", "--out", str(tmp_path / "d"), "--shard-size", "500",
                  "--train-fraction", "0.25"])
    index = json.loads((tmp_path / "d" / "webdataset.json").read_text())
    assert index["transform"] == {"kind": "array", "pad": 1, "flip": False}  # digits: no flip
    from fct.data.datasets import take_fraction

    picked = take_fraction(build_dataset("digits", "", "train", augment=False), 0.25, 0)
    assert index["splits"]["train"]["num_samples"] == len(picked) and index["splits"]["val"]["num_samples"] == 359
    stream = build_dataset("webdataset", str(tmp_path / "d"), "train", augment=False)
    assert sorted(int(y) for _, y in stream) == sorted(picked.labels.tolist())
    with pytest.raises(UserError, match="--shard-size must be >= 1"):
        prepare.prepare_webdataset("digits", None, tmp_path / "e", shard_size=0)


# --------------------------------------------------------------------------- epochs
def test_epoch_segments_deal_equal_disjoint_parts() -> None:
    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 4):
        counts = list(rng.integers(1, 20, 7))
        starts = np.cumsum([0] + counts)
        for epoch in (0, 1):
            taken = []
            for rank in range(world):
                mine = [(s, a, b) for s, a, b in epoch_segments(counts, 5, epoch, world, rank)]
                assert sum(b - a for _, a, b in mine) == sum(counts) // world
                taken += [int(starts[s]) + i for s, a, b in mine for i in range(a, b)]
            assert len(taken) == len(set(taken)) == world * (sum(counts) // world)
    assert epoch_segments([5] * 9, 1, 0, 1, 0) != epoch_segments([5] * 9, 1, 1, 1, 0)  # reshuffled per epoch
    assert epoch_segments([5] * 9, 1, 3, 2, 1) == epoch_segments([5] * 9, 1, 3, 2, 1)


def test_every_sample_once_per_epoch_seeded_and_resumable(tmp_path: Path) -> None:
    # Labels are the ids here (each sample its own class), so batches show which samples came.
    src, out = shards_of(tmp_path, shard_size=7, classes=None)
    ds = build_dataset("webdataset", str(out), "train", augment=True, options=options(shuffle_buffer=5))
    runs = {}
    for workers in (0, 2):
        batches, sampler = train_loader(ds, global_batch=8, num_workers=workers, seed=4, pin_memory=False)
        assert sampler is batches and len(batches) == 6
        runs[workers] = [epoch_labels(batches, e) for e in range(3)]
        for labels in runs[workers]:
            assert sorted(labels) == list(range(48))  # 48 = 6 x 8: each sample exactly once
        assert runs[workers][0] != runs[workers][1]  # a new order every epoch
    # A fresh loader started at epoch 2 (a resumed run) repeats epoch 2 exactly.
    fresh, _ = train_loader(ds, global_batch=8, num_workers=2, seed=4, pin_memory=False)
    assert epoch_labels(fresh, 2) == runs[2][2]
    # 48 is not a multiple of 10: 4 full batches, and 8 samples (different ones each epoch) sit out.
    b10, _ = train_loader(ds, global_batch=10, num_workers=2, seed=4, pin_memory=False)
    epochs = [epoch_labels(b10, e) for e in range(2)]
    assert all(len(e) == len(set(e)) == 40 for e in epochs) and set(epochs[0]) != set(epochs[1])


def test_augmentation_is_that_of_the_npz_set(tmp_path: Path) -> None:
    """Sample ``id`` of epoch e gets the augmentation the npz set gives index ``id`` in epoch e,
    whatever the worker count."""
    src, out = shards_of(tmp_path, shard_size=7, classes=None)
    ref = SeededDataset(build_dataset("npz", str(src), "train", augment=True), seed=4)
    ds = build_dataset("webdataset", str(out), "train", augment=True, options=options(shuffle_buffer=3))
    for workers in (0, 2):
        batches, _ = train_loader(ds, global_batch=8, num_workers=workers, seed=4, pin_memory=False)
        batches.set_epoch(1)
        for x, y in batches:
            for image, i in zip(x, y.tolist()):
                assert torch.equal(image, ref[(1, i)][0])


def test_class_subset_and_eval_loader(tmp_path: Path) -> None:
    src, out = shards_of(tmp_path, shard_size=4)
    val = build_dataset("webdataset", str(out), "val", augment=False, num_classes=3)
    assert len(val) == 9  # 13 samples of labels 0..4 -> labels 0, 1, 2
    loader = eval_loader(val, global_batch=4, num_workers=2, pin_memory=False)
    assert sorted(int(v) for _, y in loader for v in y) == sorted([i % 5 for i in range(13) if i % 5 < 3])
    assert val[0][1] == 0  # the probe: the first sample


def test_urls_override_and_pipe_urls(tmp_path: Path) -> None:
    src, out = shards_of(tmp_path, shard_size=10)
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    (tmp_path / "index").mkdir()
    (moved / "webdataset.json").rename(tmp_path / "index" / "webdataset.json")
    urls = {"train": f"pipe:cat {moved}/train-{{000000..000004}}.tar", "val": f"{moved}/val-{{000000..000001}}.tar"}
    from fct.config.loader import from_dict

    opts = from_dict(DatasetParams, {"name": "webdataset", "urls": urls, "num_samples": {"train": 48, "val": 13}})
    train = build_dataset("webdataset", str(tmp_path / "index"), "train", augment=False, options=opts)
    batches, _ = train_loader(train, global_batch=16, num_workers=0, seed=0, pin_memory=False)
    assert sorted(epoch_labels(batches, 0)) == sorted(i % 5 for i in range(48))
    val = build_dataset("webdataset", str(tmp_path / "index"), "val", augment=False, options=opts)
    assert len(list(val)) == 13


# --------------------------------------------------------------------------- training
def _backbone_config(folder: Path, dataset: str, root: Path, extra: str = "", epochs: int = 1,
                     workers: int = 0) -> BackboneConfig:
    text = textwrap.dedent(f"""\
        arch_params: {{arch: CifarResNet20, num_classes: 5, embedding_dim: 8, last_nonlin: true}}
        optimizer_params: {{algorithm: sgd, lr: 0.05, momentum: 0.9}}
        dataset_params: {{name: {dataset}, data_root: {root}, num_workers: {workers}, batch_size: 16{extra}}}
        lr_policy_params: {{algorithm: cosine_lr}}
        epochs: {epochs}
        seed: 3
        output_model_path: {folder}/model.pt
        output_dir: {folder}/run
        runtime: {{progress: false, tensorboard: false, device: cpu, channels_last: false}}
        """)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.yaml").write_text(text)
    return load_config(BackboneConfig, folder / "c.yaml", [])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from fct.models import read_model_file

    return read_model_file(path)["state_dict"]


def test_trains_to_the_npz_weights_when_the_order_is_the_same(tmp_path: Path) -> None:
    """Shards written in the order DistributedSampler gives epoch 0, one shard, no sample buffer:
    the stream then feeds the very batches (and augmentations) of the npz loader."""
    from fct.training.backbone import train_backbone

    src, out = shards_of(tmp_path, shard_size=64, n_train=40)
    images, labels = arrays.load_arrays(src / "train.npz")
    order = np.array(list(DistributedSampler(range(40), num_replicas=1, rank=0, shuffle=True, seed=3)))
    entries = webdataset.write_split(out, "train", prepare._array_samples(images[order], labels[order], order, "png"),
                                     shard_size=64)
    index = json.loads((out / "webdataset.json").read_text())
    index["splits"]["train"] = {"num_samples": 40, "shards": entries}
    (out / "webdataset.json").write_text(json.dumps(index))
    train_backbone(_backbone_config(tmp_path / "a", "npz", src))
    train_backbone(_backbone_config(tmp_path / "b", "webdataset", out, ", shuffle_buffer: 0"))
    a, b = _weights(tmp_path / "a" / "model.pt"), _weights(tmp_path / "b" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_at_an_epoch_boundary_is_exact(tmp_path: Path, killed_after_first_epoch) -> None:
    from fct.training.backbone import train_backbone

    _, out = shards_of(tmp_path, shard_size=9, n_train=40)
    train_backbone(_backbone_config(tmp_path / "straight", "webdataset", out, ", shuffle_buffer: 8", 2, workers=2))
    cfg = _backbone_config(tmp_path / "resumed", "webdataset", out, ", shuffle_buffer: 8", 2, workers=2)
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        train_backbone(cfg)
    train_backbone(cfg)
    a, b = _weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- two processes
def _rank_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = build_dataset("webdataset", root, "train", augment=True, options=options(shuffle_buffer=4))
        batches, _ = train_loader(ds, global_batch=8, num_workers=2, seed=1, pin_memory=False)
        train = [epoch_labels(batches, e) for e in range(2)]
        val = build_dataset("webdataset", root, "val", augment=False)
        seen_val = [int(v) for _, y in eval_loader(val, global_batch=4, num_workers=0, pin_memory=False) for v in y]
        from fct.retrieval import extract_features

        feats, labels = extract_features(torch.nn.Flatten(), val, batch_size=3, num_workers=0, device="cpu",
                                         progress=False)  # each process a part of every shard, then gathered
        torch.save({"train": train, "steps": len(batches), "val": seen_val, "feats": feats, "labels": labels},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_processes_are_dealt_disjoint_equal_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader of each of 3 processes (their rank faked in one process; the real thing below)."""
    from fct import dist

    _, out = shards_of(tmp_path, shard_size=7, n_train=45, classes=None)
    ds = build_dataset("webdataset", str(out), "train", augment=False, options=options(shuffle_buffer=4))
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(dist, "rank", lambda: rank)
        batches, _ = train_loader(ds, global_batch=12, num_workers=2, seed=1, pin_memory=False)
        assert len(batches) == 3  # 45 // 3 = 15 per process: 3 batches of 4, 3 samples sit out
        seen.append(epoch_labels(batches, 0))
    assert all(len(s) == 12 for s in seen) and len(set(seen[0] + seen[1] + seen[2])) == 36


@pytest.mark.slow
def test_two_processes_read_disjoint_samples(tmp_path: Path) -> None:
    if not tdist.is_available() or not tdist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # 45 samples in shards of 7 over 2 processes: 22 each, 5 steps of 4 (2 left over per process).
    src, out = shards_of(tmp_path, shard_size=7, n_train=45, n_val=11, classes=None)
    mp.spawn(_rank_worker, args=(2, free_port(), str(out), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    assert got[0]["steps"] == got[1]["steps"] == 5
    for epoch in range(2):
        a, b = (set(g["train"][epoch]) for g in got)
        assert len(a) == len(b) == 20 and not a & b
    assert sorted(got[0]["val"] + got[1]["val"]) == list(range(11))  # evaluation: every sample once
    # features of the stream under 2 processes: every process holds all 11 rows, in the npz set's order
    from fct.retrieval import extract_features

    feats, labels = extract_features(torch.nn.Flatten(), build_dataset("npz", str(src), "val", augment=False),
                                     batch_size=4, num_workers=0, device="cpu", progress=False)
    for g in got:
        assert torch.equal(g["feats"], feats) and torch.equal(g["labels"], labels)


# --------------------------------------------------------------------------- errors
def test_user_errors(tmp_path: Path) -> None:
    src, out = shards_of(tmp_path, shard_size=10)
    with pytest.raises(UserError, match=r"webdataset.json not found.*prepare_dataset.py"):
        dataset_info("webdataset", str(src))
    with pytest.raises(UserError, match=r"num_samples.train=47 but .* counts 48"):
        dataset_info("webdataset", str(out), options(num_samples=_counts(train=47)))
    with pytest.raises(UserError, match=r"urls.train=.* expands to 2 shards but .* lists 5"):
        build_dataset("webdataset", str(out), "train", augment=True,
                      options=options(urls=_urls(train=f"{out}/train-{{000000..000001}}.tar")))
    (out / "train-000003.tar").rename(tmp_path / "gone.tar")
    with pytest.raises(UserError, match=r"shard .*train-000003.tar not found"):
        build_dataset("webdataset", str(out), "train", augment=True)
    (tmp_path / "gone.tar").rename(out / "train-000003.tar")
    stream = build_dataset("webdataset", str(out), "train", augment=False)
    with pytest.raises(UserError, match="without random access"):
        stream[3]
    with pytest.raises(UserError, match="without random access"):
        stream.labels
    with pytest.raises(ConfigError, match="batch_size=64 is larger than the 48"):
        StreamBatches(stream, batch=64, num_workers=0, seed=0, pin_memory=False, collate_fn=list)
    with pytest.raises(ConfigError, match="urls applies to name: webdataset only"):
        DatasetParams(name="npz", urls=_urls(train="a.tar"))
    with pytest.raises(ConfigError, match="train_fraction needs random access"):
        options(train_fraction=0.5)
    with pytest.raises(ConfigError, match="did you mean"):
        from fct.config.loader import from_dict

        from_dict(DatasetParams, {"name": "webdataset", "url": {"train": "x"}}, source="c.yaml")
    # A shard holding fewer samples than its index promises stops the epoch with a clear message.
    index = json.loads((out / "webdataset.json").read_text())
    index["splits"]["train"]["shards"][0]["num_samples"] += 1
    index["splits"]["train"]["shards"][0]["class_counts"]["0"] += 1
    index["splits"]["train"]["num_samples"] += 1
    (out / "webdataset.json").write_text(json.dumps(index))
    batches, _ = train_loader(build_dataset("webdataset", str(out), "train", augment=True), global_batch=7,
                              num_workers=2, seed=0, pin_memory=False)
    with pytest.raises(UserError, match=r"^shard .*train-000000.tar holds 10 samples .* promises 11"):
        epoch_labels(batches, 0)


def _urls(**kw):
    from fct.config.common import SplitUrls

    return SplitUrls(**kw)


def _counts(**kw):
    from fct.config.common import SplitCounts

    return SplitCounts(**kw)


def test_embed_of_a_stream_equals_the_arrays_by_id(tmp_path: Path, capsys) -> None:
    """fct.embed over shards writes one output shard per input shard, ids from the shards; the
    embeddings equal those of the same images read from the npz set; an .npz output is refused."""
    import torch

    from fct.cli import run_main
    from fct.embed import main
    from fct.models import build_backbone, save_model_file
    from fct.retrieval.embeddings import read_feature_file

    src, out = shards_of(tmp_path, shard_size=5)
    torch.manual_seed(0)
    arch = {"arch": "CifarResNet20", "num_classes": 5, "embedding_dim": 8}
    save_model_file(tmp_path / "model.pt", build_backbone(**arch).eval(), kind="backbone", arch_params=arch)

    def config(name: str, data: str, output: str) -> Path:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            model_path: {tmp_path}/model.pt
            dataset_params: {data}
            split: val
            output_path: {output}
            runtime: {{progress: false, tensorboard: false}}
            """))
        return cfg

    stream = f"{{name: webdataset, data_root: {out}, num_workers: 0, batch_size: 4}}"
    assert run_main(main, ["--config", str(config("bad", stream, f"{tmp_path}/e.npz"))]) == 2
    assert "give a folder, not an .npz" in one_error_line(capsys.readouterr().err)
    assert run_main(main, ["--config", str(config("wds", stream, f"{tmp_path}/from_shards"))]) == 0
    arrays = f"{{name: npz, data_root: {src}, num_workers: 0, batch_size: 4}}"
    assert run_main(main, ["--config", str(config("npz", arrays, f"{tmp_path}/from_npz.npz"))]) == 0
    a, b = read_feature_file(str(tmp_path / "from_npz.npz")), read_feature_file(str(tmp_path / "from_shards"))
    assert len(list((tmp_path / "from_shards").glob("shard-*.done"))) == 3  # 13 validation images, shards of 5
    order = np.argsort(b.ids)
    np.testing.assert_array_equal(b.ids[order], a.ids)
    np.testing.assert_array_equal(b.labels[order], a.labels)
    np.testing.assert_allclose(b.features[order], a.features, rtol=1e-5, atol=1e-6)
    # a rerun with nothing changed does nothing
    assert run_main(main, ["--config", str(config("wds", stream, f"{tmp_path}/from_shards"))]) == 0
    assert "is up to date" in capsys.readouterr().out


def test_eval_of_a_stream_equals_that_of_the_npz_set(tmp_path: Path) -> None:
    """eval.py reads the validation shards directly (shard by shard, rows in id order): the results
    equal those of the npz set the shards were written from, with a class subset too."""
    from fct.cli import run_main
    from fct.models import build_backbone, save_model_file
    from fct.retrieval import extract_features

    from eval import main

    src, out = shards_of(tmp_path, shard_size=4, n_val=19, classes=3)
    stream = build_dataset("webdataset", str(out), "val", augment=False)
    a, la = extract_features(torch.nn.Flatten(), stream, batch_size=3, num_workers=0, device="cpu", progress=False)
    b, lb = extract_features(torch.nn.Flatten(), build_dataset("npz", str(src), "val", augment=False),
                             batch_size=5, num_workers=0, device="cpu", progress=False)
    assert torch.equal(a, b) and torch.equal(la, lb)
    torch.manual_seed(0)
    arch = {"arch": "CifarResNet20", "num_classes": 3, "embedding_dim": 8}
    save_model_file(tmp_path / "model.pt", build_backbone(**arch).eval(), kind="backbone", arch_params=arch)
    results = {}
    for name, data in (("npz", src), ("webdataset", out)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            query_model_path: {tmp_path}/model.pt
            gallery_model_path: {tmp_path}/model.pt
            dataset_params: {{name: {name}, data_root: {data}, num_workers: 0, batch_size: 4}}
            eval_params: {{verbose: false, compute_map: true}}
            results_path: {tmp_path}/{name}.json
            runtime: {{progress: false}}
            """))
        assert run_main(main, ["--config", str(cfg)]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("top1", "top5", "mAP"):
        assert results["webdataset"][key] == pytest.approx(results["npz"][key], abs=1e-9), key
