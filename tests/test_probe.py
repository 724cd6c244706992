"""python -m fct.models.probe: a backbone's classifier fitted on stored embeddings, nothing else changed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fct.models import load_model_file, read_model_file
from fct.cli import run_main
from fct.models.probe import fit_linear_probe, main
from helpers import one_error_line, run_script, write_backbones


def _blobs(n_per_class: int = 40, dim: int = 16, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3.0
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_the_fit_is_the_minimum_of_the_penalised_cross_entropy():
    """A convex problem: at the returned W the gradient of the objective vanishes (checked in float64
    by autograd on the objective as written), and separable blobs are classified without error."""
    x, y = _blobs()
    w = fit_linear_probe(x, y, 10, label_smoothing=0.1, weight_decay=1e-3, steps=200)
    w64 = w.double().requires_grad_(True)
    obj = F.cross_entropy(x.double() @ w64.T, y, label_smoothing=0.1) + 0.5 * 1e-3 * (w64 * w64).sum()
    (grad,) = torch.autograd.grad(obj, w64)
    assert grad.abs().max() < 1e-4
    assert (x @ w.T).argmax(1).eq(y).all()
    # by hand: x = +1 (class 0) and -1 (class 1), no smoothing, weight decay 1. By symmetry W = [[a], [-a]];
    # the objective is -log sigmoid(2a) + a^2, stationary where a = sigmoid(-2a): a = 0.3374 to 4 digits
    w2 = fit_linear_probe(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]), 2, label_smoothing=0.0,
                          weight_decay=1.0)
    a = float(w2[0, 0])
    assert a == pytest.approx(0.3374, abs=1e-4) and float(w2[1, 0]) == pytest.approx(-a)
    assert a == pytest.approx(torch.sigmoid(torch.tensor(-2 * a, dtype=torch.float64)).item(), abs=1e-6)


def test_probe_writes_the_model_with_only_its_classifier_fitted(tmp_path, capsys):
    models = write_backbones(tmp_path / "m", (("new", 16, 1),))
    x, y = _blobs()
    np.savez(tmp_path / "train.npz", features=x.numpy(), labels=y.numpy())
    np.savez(tmp_path / "val.npz", features=x[::2].numpy(), labels=y[::2].numpy())
    record = main(["--model", str(models / "new.pt"), "--features", str(tmp_path / "train.npz"),
                   "--val-features", str(tmp_path / "val.npz"), "--out", str(tmp_path / "probed.pt")])
    assert "training top-1 100.00%, validation top-1 100.00%" in capsys.readouterr().out
    before, after = load_model_file(models / "new.pt").state_dict(), load_model_file(tmp_path / "probed.pt").state_dict()
    assert before.keys() == after.keys()
    for k in before:
        if k == "classifier.weight":
            torch.testing.assert_close(after[k], fit_linear_probe(x, y, 10))
        else:
            assert torch.equal(before[k], after[k]), k
    meta = read_model_file(tmp_path / "probed.pt")["meta"]
    assert meta["probe"] == record and record["features"]["rows"] == 400 and record["val_top1"] == 100.0
    assert len(record["features"]["sha256"]) == 64


@pytest.mark.parametrize("case,message", [
    ("labels", "has labels 2..11; the model's classifier has 10 rows (labels 0..9)"),
    ("dim", "holds (400, 8) features; the model's classifier takes 16-d embeddings"),
    ("same", "--out is the input --model"),
    ("kind", "is a 'transformation' model file"),
])
def test_probe_refuses_what_does_not_fit(tmp_path, capsys, case, message):
    models = write_backbones(tmp_path / "m", (("new", 16, 1),))
    x, y = _blobs()
    if case == "labels":
        y = y + 2
    if case == "dim":
        x = x[:, :8]
    np.savez(tmp_path / "train.npz", features=x.numpy(), labels=y.numpy())
    model, out = models / "new.pt", tmp_path / "out.pt"
    if case == "same":
        out = model
    if case == "kind":
        from fct.models import save_transformation
        from fct.transformations import build_transformation

        arch = {"arch": "MLP_BN_SIDE_PROJECTION", "old_embedding_dim": 16, "new_embedding_dim": 16, "inner_dim": 8}
        model = tmp_path / "h.pt"
        save_transformation(model, build_transformation(**arch), arch)
    before = model.read_bytes()
    code = run_main(main, ["--model", str(model), "--features", str(tmp_path / "train.npz"), "--out", str(out)])
    assert code == 2 and message in one_error_line(capsys.readouterr().err)
    assert model.read_bytes() == before and (case == "same" or not out.exists())


def test_a_config_file_gives_the_same_model_as_the_flags(tmp_path, capsys):
    models = write_backbones(tmp_path / "m", (("new", 16, 1),))
    x, y = _blobs()
    np.savez(tmp_path / "train.npz", features=x.numpy(), labels=y.numpy())
    main(["--model", str(models / "new.pt"), "--features", str(tmp_path / "train.npz"), "--weight-decay", "0.01",
          "--out", str(tmp_path / "flags.pt")])
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"model_path: {models / 'new.pt'}\nfeatures_path: {tmp_path / 'train.npz'}\n"
                   f"output_model_path: {tmp_path / 'wrong.pt'}\nweight_decay: 0.01\n")
    main(["--config", str(cfg), "--set", f"output_model_path={tmp_path / 'config.pt'}"])
    a, b = (load_model_file(tmp_path / f"{n}.pt").state_dict() for n in ("flags", "config"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not (tmp_path / "wrong.pt").exists()
    capsys.readouterr()
    assert run_main(main, ["--config", str(cfg), "--model", str(models / "new.pt")]) == 2
    assert "--config gives the files; drop --model" in one_error_line(capsys.readouterr().err)
    cfg.write_text(cfg.read_text() + "label_smoothing: 1.5\n")
    assert run_main(main, ["--config", str(cfg)]) == 2
    assert "label_smoothing 1.5: give a value in [0, 1)" in one_error_line(capsys.readouterr().err)
    r = run_script("-m", "fct.models.probe", "--model", str(models / "new.pt"))  # the module runs as a script
    assert r.returncode == 2 and "give --features (or --config)" in one_error_line(r.stderr)
