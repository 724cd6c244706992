"""train_backbone with ssl_params (label-free SimCLR side-information models) and init_from."""

import hashlib
import json
import os
import textwrap

import pytest
import torch

from fct.config import BackboneConfig, load_config
from fct.errors import UserError
from fct.models import build_backbone, load_model_file, read_model_file, save_model_file
from fct.training.backbone import apply_init_from
from helpers import REPO, free_port, run_cli, run_script


def ssl_config(tmp_path, epochs=2, extra=""):
    """A tiny SimCLR run: digits classes 0..1 (~290 images), batch 32, 16-d embedding."""
    text = textwrap.dedent(f"""\
        arch_params: {{arch: CifarResNet20, num_classes: 1, embedding_dim: 16}}
        optimizer_params: {{algorithm: sgd, lr: 0.1, weight_decay: 0.0005, momentum: 0.9}}
        dataset_params: {{name: digits, num_classes: 2, num_workers: 0, batch_size: 32}}
        ssl_params: {{temperature: 0.2, projection_hidden_dim: 32, projection_dim: 8, knn_every: 2}}
        epochs: {epochs}
        seed: 5
        output_model_path: {tmp_path}/model.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """) + extra
    p = tmp_path / "ssl.yaml"
    p.write_text(text)
    return p


def supervised_config(tmp_path, extra=""):
    text = textwrap.dedent(f"""\
        arch_params: {{arch: CifarResNet20, num_classes: 5, embedding_dim: 16}}
        optimizer_params: {{algorithm: sgd, lr: 0.05}}
        dataset_params: {{name: digits, num_classes: 3, num_workers: 0, batch_size: 64}}
        epochs: 1
        seed: 2
        output_model_path: {tmp_path}/model.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """) + extra
    p = tmp_path / "sup.yaml"
    p.write_text(text)
    return p



def assert_user_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


# --------------------------------------------------------------------------- config
@pytest.mark.slow
def test_bad_ssl_settings_exit_2(tmp_path):
    cfg = ssl_config(tmp_path)
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", "ssl_params.temperature=0")
    assert_user_error(r, "ssl_params.temperature must be > 0")
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", "ssl_params.method=byol")
    assert_user_error(r, "ssl_params.method", "'simclr'")


@pytest.mark.parametrize("override, fragment", [
    ("ssl_params.projection_dim=0", "ssl_params.projection_dim must be >= 1"),
    ("ssl_params.knn_every=0", "ssl_params.knn_every must be >= 1"),
    ("ssl_params.augmentation={hue: 0.7}", "hue must be in [0, 0.5]"),
    ("ssl_params.augmentation={crop_scale: [0.5, 0.7, 1.0]}", "crop_scale must be two numbers"),
    ("ssl_params.augmentation={flipp: true}", "ssl_params.augmentation.flipp"),
    ("label_smoothing=0.1", "label_smoothing=0.1 has no effect with ssl_params"),
    ("init_from=''", "init_from is an empty path"),
])
def test_invalid_values_name_the_key(tmp_path, override, fragment):
    with pytest.raises(UserError) as e:
        load_config(BackboneConfig, ssl_config(tmp_path), [override])
    assert fragment in str(e.value)


def test_ssl_config_loads_with_defaults_and_an_augmentation(tmp_path):
    cfg = load_config(BackboneConfig, ssl_config(tmp_path), ["ssl_params.augmentation={crop_scale: [0.6, 1.0]}"])
    assert cfg.ssl_params.method == "simclr" and cfg.ssl_params.knn_k == 20
    assert cfg.ssl_params.augmentation.crop_scale == (0.6, 1.0) and cfg.ssl_params.augmentation.flip
    # label-free runs never use the classifier: it may be narrower than the classes selected
    assert cfg.arch_params.num_classes == 1 and cfg.dataset_params.num_classes == 2
    quick = load_config(BackboneConfig, os.path.join(REPO, "configs/quickstart/digits_side_info_simclr.yaml"))
    assert quick.ssl_params is not None and quick.init_from is None


# --------------------------------------------------------------------------- SimCLR runs
@pytest.mark.slow
def test_simclr_script_writes_a_label_free_backbone(tmp_path):
    r = run_script("train_backbone.py", "--config", str(ssl_config(tmp_path, epochs=2)))
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and "(no k-NN this epoch)" in r.stdout and "val k-NN top-1" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert "val_knn_top1" not in lines[0]  # knn_every: 2
    assert {"train_loss", "lr", "val_knn_top1", "val_loo_top1"} <= set(lines[1])
    assert not {"train_top1", "val_top1"} & set(lines[1])  # no labels, no classifier metrics
    assert 0.0 <= lines[1]["val_knn_top1"] <= 100.0
    header = read_model_file(tmp_path / "model.pt")
    assert header["kind"] == "backbone" and header["meta"]["label_free"] is True
    ssl = header["meta"]["ssl"]
    assert ssl["method"] == "simclr" and ssl["temperature"] == 0.2
    assert ssl["augmentation"]["crop_scale"] == [0.5, 1.0]  # the digits recipe, as resolved
    # only the backbone is kept: no projection head, no SimCLRModel prefix
    assert not any(k.startswith(("head.", "backbone.")) for k in header["state_dict"])
    model = load_model_file(tmp_path / "model.pt")
    assert model(torch.zeros(2, 3, 8, 8)).embedding.shape == (2, 16)
    # the checkpoint holds backbone and head together (exact resume)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("head.") for k in ck["model"]) and ck["epoch"] == 2


def test_interrupted_simclr_run_resumes_to_identical_weights(tmp_path, killed_after_first_epoch):
    import fct.training.backbone as tb

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tb.train_backbone(load_config(BackboneConfig, ssl_config(full_dir)))
        cfg = load_config(BackboneConfig, ssl_config(cut_dir))
        with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
            tb.train_backbone(cfg)
        tb.train_backbone(cfg)  # resumes at epoch 1
    finally:
        torch.set_num_threads(threads)
    a = torch.load(full_dir / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(cut_dir / "run" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # backbone and projection head
        assert torch.equal(a["model"][k], b["model"][k]), k
    wa, wb = read_model_file(full_dir / "model.pt")["state_dict"], read_model_file(cut_dir / "model.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = json.loads((full_dir / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    mb = json.loads((cut_dir / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ma["train_loss"] == mb["train_loss"] and ma["val_knn_top1"] == mb["val_knn_top1"]


# --------------------------------------------------------------------------- init_from
def _save(path, arch="CifarResNet20", num_classes=5, embedding_dim=16, seed=0):
    torch.manual_seed(seed)
    model = build_backbone(arch, num_classes=num_classes, embedding_dim=embedding_dim)
    with torch.no_grad():  # non-trivial buffers, so they are seen to be copied too
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    save_model_file(path, model, kind="backbone",
                    arch_params={"arch": arch, "num_classes": num_classes, "embedding_dim": embedding_dim})
    return model


def test_apply_init_from_copies_every_tensor_and_widens_the_classifier(tmp_path):
    old = _save(tmp_path / "old.pt", num_classes=5)
    torch.manual_seed(1)
    new = build_backbone("CifarResNet20", num_classes=8, embedding_dim=16)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    info = apply_init_from(new, tmp_path / "old.pt")
    assert info == {"path": str(tmp_path / "old.pt"),
                    "sha256": hashlib.sha256((tmp_path / "old.pt").read_bytes()).hexdigest()}
    src, dst = old.state_dict(), new.state_dict()
    for k in src:
        if k != "classifier.weight":
            assert torch.equal(dst[k], src[k]), k
    assert torch.equal(dst["classifier.weight"][:5], src["classifier.weight"])
    assert torch.equal(dst["classifier.weight"][5:], fresh["classifier.weight"][5:])  # new rows kept
    assert not torch.equal(fresh["classifier.weight"][:5], src["classifier.weight"])


def test_apply_init_from_refuses_mismatches(tmp_path):
    _save(tmp_path / "old.pt", num_classes=5)
    with pytest.raises(UserError, match=r"classifier.weight has shape \(5, 16\) .* but \(3, 16\)"):
        apply_init_from(build_backbone("CifarResNet20", num_classes=3, embedding_dim=16), tmp_path / "old.pt")
    with pytest.raises(UserError, match="is a CifarResNet20 but arch_params.arch is CifarResNet32"):
        apply_init_from(build_backbone("CifarResNet32", num_classes=5, embedding_dim=16), tmp_path / "old.pt")
    with pytest.raises(UserError, match="does not exist"):
        apply_init_from(build_backbone("CifarResNet20", num_classes=5), tmp_path / "nothing.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a model file"):
        apply_init_from(build_backbone("CifarResNet20", num_classes=5), tmp_path / "notes.txt")


@pytest.mark.slow
def test_init_from_script_errors_exit_2(tmp_path):
    _save(tmp_path / "old.pt", embedding_dim=32)
    cfg = supervised_config(tmp_path)
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", f"init_from={tmp_path}/old.pt")
    assert_user_error(r, "layer3.2.conv1.weight has shape (32, 64, 3, 3)", "(16, 64, 3, 3) in the model")
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", f"init_from={tmp_path}/missing.pt")
    assert_user_error(r, f"{tmp_path}/missing.pt does not exist")


def test_init_from_run_records_the_file_and_a_resume_wins(tmp_path):
    import fct.training.backbone as tb

    _save(tmp_path / "old.pt", num_classes=3)
    digest = hashlib.sha256((tmp_path / "old.pt").read_bytes()).hexdigest()
    cfg = load_config(BackboneConfig, supervised_config(tmp_path, extra=f"init_from: {tmp_path}/old.pt\n"))
    tb.train_backbone(cfg)
    meta = read_model_file(tmp_path / "model.pt")["meta"]
    assert meta["init_from"] == {"path": f"{tmp_path}/old.pt", "sha256": digest}
    assert "label_free" not in meta
    # The run is finished: rerunning resumes from its checkpoint, which wins over init_from (the
    # file is no longer needed) and keeps the record.
    (tmp_path / "old.pt").unlink()
    before = read_model_file(tmp_path / "model.pt")["state_dict"]
    tb.train_backbone(cfg)
    after = read_model_file(tmp_path / "model.pt")
    assert after["meta"]["init_from"]["sha256"] == digest
    assert all(torch.equal(before[k], after["state_dict"][k]) for k in before)


# --------------------------------------------------------------------------- DDP

def _simclr_first_step(rank, world, port, out_dir):
    """One SimCLR step of the training pipeline (seeded two-view loader, DDP with the frozen
    classifier, gathered negatives); BatchNorm in eval mode so the batch split cannot matter."""
    from fct.config import RuntimeParams
    from fct.runtime import make_runtime, seed_everything
    from fct.ssl import ProjectionHead, SimCLRModel, build_two_view_dataset, simclr_loss_fn, two_view_collate
    from fct.runtime import wrap_ddp
    from fct.training.loaders import train_loader
    from fct.training.loop import image_step

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rt = make_runtime(RuntimeParams(device="cpu", progress=False, channels_last=False))
    try:
        data = build_two_view_dataset("digits", "", "train", num_classes=2)
        seed_everything(5)
        model = SimCLRModel(build_backbone("CifarResNet20", num_classes=1, embedding_dim=16), ProjectionHead(16, 32, 8))
        net = wrap_ddp(model, rt)
        net.eval()
        loader, sampler = train_loader(data, global_batch=32, num_workers=0, seed=5, pin_memory=False,
                                       collate_fn=two_view_collate)
        sampler.set_epoch(0)
        loss, _, _ = image_step(net, rt, simclr_loss_fn(0.2))(next(iter(loader)))
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/{world}_{rank}.pt")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_simclr_step_equals_one_process(tmp_path):
    """With W=2 gloo processes the averaged loss and the DDP gradient of one SimCLR step equal
    one process's on the whole batch (whole-run weights differ only through per-process
    BatchNorm statistics on the CPU; GPUs use SyncBatchNorm)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _simclr_first_step(0, 1, 0, str(tmp_path))
    mp.spawn(_simclr_first_step, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    one, r0, r1 = (torch.load(tmp_path / f, weights_only=True) for f in ("1_0.pt", "2_0.pt", "2_1.pt"))
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, one["loss"])
    assert one["grads"].keys() == r0["grads"].keys() and "backbone.classifier.weight" not in one["grads"]
    for k, g in one["grads"].items():
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k  # DDP's all-reduce
        torch.testing.assert_close(r0["grads"][k], g, rtol=1e-4, atol=1e-6)
