"""train_backbone end to end on digits: outputs, resume equality, non-finite loss, DDP."""

import json
import os

import pytest
import torch
from torch import nn

from fct.config import BackboneConfig, load_config
from fct.errors import RunError, UserError
from fct.models import load_model_file, read_model_file
from helpers import digits_backbone_config as digits_config, free_port, run_cli, run_script




@pytest.mark.slow
def test_train_backbone_script_one_epoch(tmp_path):
    cfg = digits_config(tmp_path, epochs=1, tensorboard=True)
    r = run_script("train_backbone.py", "--config", str(cfg), "--set", "seed=4")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0]
    assert {"train_loss", "val_top1", "val_top5", "lr", "images_per_s"} <= set(lines[0])
    assert (run / "checkpoint.pt").exists() and (run / "config.yaml").exists()
    assert "seed: 4" in (run / "config.yaml").read_text()  # the resolved config, overrides applied
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    header = read_model_file(tmp_path / "model.pt")
    assert header["kind"] == "backbone" and header["arch_params"]["arch"] == "CifarResNet20"
    model = load_model_file(tmp_path / "model.pt")
    out = model(torch.zeros(2, 3, 8, 8))
    assert out.embedding.shape == (2, 16) and out.logits.shape == (2, 10)
    # a second run finds the finished checkpoint and only rewrites the model file
    r = run_script("train_backbone.py", "--config", str(cfg), "--set", "seed=4")
    assert r.returncode == 0, r.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_user_errors_exit_2(tmp_path):
    """The first refusal as a real process (its exit status), the others in process (tests/helpers.run_cli)."""
    cfg = digits_config(tmp_path, epochs=1)
    for run, args, fragment in [
        (run_script, ["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (run_cli, ["--config", str(cfg), "--set", "optimizer_params.lrr=1"], "optimizer_params.lrr"),
        (run_cli, ["--config", str(cfg), "--set", "dataset_params.name=cifar100",
                   "--set", f"dataset_params.data_root={tmp_path}/nothing"], "nothing"),
        (run_cli, ["--config", str(cfg), "--set", "arch_params.arch=ResNet5"], "ResNet50"),
    ]:
        r = run("train_backbone.py", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and fragment in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _weights(path):
    return read_model_file(path)["state_dict"]


def test_interrupted_run_resumes_to_identical_weights(tmp_path, killed_after_first_epoch):
    import fct.training.backbone as tb

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    tb.train_backbone(load_config(BackboneConfig, digits_config(full_dir)))

    cfg = load_config(BackboneConfig, digits_config(cut_dir))
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        tb.train_backbone(cfg)
    assert not (cut_dir / "model.pt").exists()
    tb.train_backbone(cfg)  # resumes at epoch 1
    a, b = _weights(full_dir / "model.pt"), _weights(cut_dir / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    epochs = [json.loads(x)["epoch"] for x in (cut_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_resume_refuses_a_different_config(tmp_path):
    import fct.training.backbone as tb

    tb.train_backbone(load_config(BackboneConfig, digits_config(tmp_path, epochs=1)))
    other = load_config(BackboneConfig, digits_config(tmp_path, epochs=1), ["optimizer_params.lr=0.05"])
    with pytest.raises(UserError, match="optimizer_params.lr changed"):
        tb.train_backbone(other)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import fct.training.backbone as tb

    cfg = load_config(BackboneConfig, digits_config(tmp_path, epochs=2))
    good = tb.classification_loss(0.1)
    state = {"epoch_calls": 0}

    def loss_nan_in_second_epoch(smoothing):
        def fn(out, labels):
            loss, logits = good(out, labels)
            state["epoch_calls"] += 1
            return (loss * float("nan") if state["epoch_calls"] > 11 else loss), logits

        return fn

    monkeypatch.setattr(tb, "classification_loss", loss_nan_in_second_epoch)
    with pytest.raises(RunError, match="non-finite training loss at epoch 1"):
        tb.train_backbone(cfg)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()



@pytest.mark.slow
def test_two_process_ddp_run_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes: same data order and augmentation as one process; with
    BatchNorm on per-process halves of the batch the weights are close, not bitwise equal (the
    exact equality of the gradient path is checked in test_ddp_gradient_path_is_exact)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    lr = ["--set", "optimizer_params.lr=0.02"]  # a gentle step keeps the two trajectories comparable
    r = run_script("train_backbone.py", "--config", str(digits_config(one, epochs=1)), *lr)
    assert r.returncode == 0, r.stderr
    r = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "train_backbone.py", "--config", str(digits_config(two, epochs=1)), *lr)
    assert r.returncode == 0, r.stderr
    a, b = _weights(one / "model.pt"), _weights(two / "model.pt")
    num = sum((a[k].float() - b[k].float()).norm() ** 2 for k in a if a[k].is_floating_point()) ** 0.5
    den = sum(a[k].float().norm() ** 2 for k in a if a[k].is_floating_point()) ** 0.5
    assert num / den < 0.05, float(num / den)
    m1 = json.loads((one / "run" / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((two / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(m1["train_loss"] - m2["train_loss"]) < 0.05


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    _train_mlp(out_dir / f"mlp_{world}.pt")
    torch.distributed.destroy_process_group()


def _train_mlp(path):
    from fct import dist
    from fct.config import RuntimeParams
    from fct.data import build_dataset
    from fct.runtime import make_runtime
    from fct.training.loaders import train_loader
    from fct.training.loop import image_step, train_one_epoch

    class MLP(nn.Module):  # no BatchNorm: per-process statistics would differ
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            return type("Out", (), {"logits": self.net(x)})()

    torch.manual_seed(0)
    model = MLP()
    rt = make_runtime(RuntimeParams(progress=False, channels_last=False))
    ddp = nn.parallel.DistributedDataParallel(model) if dist.is_dist() else model
    ds = build_dataset("digits", "", "train", augment=True, num_classes=None)
    loader, sampler = train_loader(ds, global_batch=32, num_workers=0, seed=5, pin_memory=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = lambda out, y: (nn.functional.cross_entropy(out.logits, y), out.logits)  # noqa: E731
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ddp.train()
        train_one_epoch(image_step(ddp, rt, loss_fn), loader, opt, lambda e: 0.05, epoch, rt)
    if dist.is_main():
        torch.save(model.state_dict(), path)


@pytest.mark.slow
def test_ddp_gradient_path_is_exact(tmp_path):
    """Seeded augmentation + round-robin sharding + gradient averaging: 2 processes with global
    batch 32 reproduce one process with batch 32 (BN-free model), to float rounding."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    _train_mlp(tmp_path / "mlp_1.pt")
    a = torch.load(tmp_path / "mlp_1.pt", weights_only=True)
    b = torch.load(tmp_path / "mlp_2.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
