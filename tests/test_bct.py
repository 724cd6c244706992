"""Compatibility objectives of train_backbone: BCT's influence loss and learned backward maps."""

import json
import math
import os
import textwrap

import pytest
import torch
from torch import nn

from fct.config import BackboneConfig, load_config
from fct.config import RuntimeParams
from fct.config.transformation import TransformationConfig
from fct.data import build_dataset
from fct.errors import UserError
from fct.models import (BackboneOutput, build_backbone, load_model_file, read_model_file, save_model_file,
                        save_transformation)
from fct.runtime import Runtime
from fct.training.compat_losses import (
    build_backward_map,
    class_mean_features,
    composed_alignment_losses,
    influence_loss,
    map_features,
    old_class_means,
    old_classifier_rows,
    synthesised_rows_from,
)
from helpers import REPO, run_cli, run_script

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False,
              params=RuntimeParams(device="cpu", progress=False, tensorboard=False))


# --------------------------------------------------------------------------- pure pieces
def test_class_means_by_hand():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0], [-1.0, 1.0]])
    labels = torch.tensor([2, 2, 7, 3, 3])
    means = class_mean_features(feats, labels, [2, 3])
    assert torch.allclose(means, torch.tensor([[2.0, 3.0], [2.0, 3.0]]))  # class 7 is ignored
    with pytest.raises(UserError, match="class 4 has no training image"):
        class_mean_features(feats, labels, [3, 4])


class _Dataset(torch.utils.data.Dataset):
    """Constant images: sample i is filled with value v_i in channel 0 and 2 v_i in channel 1."""

    def __init__(self, values, labels):
        self.values, self.labels = values, torch.tensor(labels).numpy()

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        img = torch.zeros(3, 2, 2)
        img[0], img[1] = self.values[i], 2 * self.values[i]
        return img, int(self.labels[i])


class _PoolingModel(nn.Module):
    """An identity-like 'old model': the embedding is the per-channel mean of the image."""

    def forward(self, x):
        return BackboneOutput(embedding=x.mean(dim=(2, 3)), logits=None)


def test_synthesised_rows_are_old_class_means():
    ds = _Dataset([1.0, 3.0, 5.0, 2.0, 4.0], [0, 1, 1, 2, 1])
    means = old_class_means(_PoolingModel(), ds, [1, 2], 3, CPU, batch_size=2, num_workers=0)
    # class 1: values 3, 5, 4 -> mean 4 ; class 2: value 2
    assert torch.allclose(means, torch.tensor([[4.0, 8.0, 0.0], [2.0, 4.0, 0.0]]))


def test_synthesised_rows_scaled_to_the_trained_rows_by_hand():
    trained = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1 -> mean 3
    means = torch.tensor([[6.0, 8.0], [0.0, 2.0], [0.0, 0.0]])  # norms 10, 2, 0
    scaled = synthesised_rows_from(means, trained, "scaled")
    assert torch.allclose(scaled, torch.tensor([[1.8, 2.4], [0.0, 3.0], [0.0, 0.0]]))  # an all-zero mean stays 0
    assert torch.equal(synthesised_rows_from(means, trained, "mean"), means)
    with pytest.raises(ValueError, match="unknown mode 'norm'"):
        synthesised_rows_from(means, trained, "norm")


def test_influence_loss_by_hand_two_classes():
    phi = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w_old = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # row c = class c
    labels = torch.tensor([0, 1])
    # logits = phi @ W^T: sample 0 -> [1, 0], sample 1 -> [2, 2]
    nll = [math.log(1 + math.exp(-1.0)), math.log(2.0)]
    assert influence_loss(phi, w_old, labels).item() == pytest.approx(sum(nll) / 2, rel=1e-6)
    # label smoothing eps: (1 - eps) * nll + eps * mean over classes of -log p
    eps = 0.2
    lp0 = [-math.log(1 + math.exp(-1.0)), -math.log(1 + math.exp(1.0))]
    lp1 = [-math.log(2.0), -math.log(2.0)]
    want = sum((1 - eps) * -lp[y] + eps * -sum(lp) / 2 for lp, y in ((lp0, 0), (lp1, 1))) / 2
    assert influence_loss(phi, w_old, labels, label_smoothing=eps).item() == pytest.approx(want, rel=1e-6)


def test_composed_alignment_by_hand_k2():
    z2 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # version 2 embeddings (N=2, d_2=2)
    b2 = build_backward_map(2, 3)  # LINEAR on [z, z]: effective matrix A = W[:, :2] + W[:, 2:]
    with torch.no_grad():
        b2.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]))
        b2.linear.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    mapped = map_features(b2, z2)  # A z + b: [z0, 2 z1, 2 z0 + 1]
    assert torch.allclose(mapped, torch.tensor([[1.0, 4.0, 3.0], [0.0, -2.0, 1.0]]))
    b1 = nn.Linear(3, 1, bias=False)  # B_1: version 1 (3-d) -> version 0 (1-d), sum of the coordinates
    with torch.no_grad():
        b1.weight.fill_(1.0)
    z1 = torch.tensor([[1.0, 4.0, 1.0], [0.0, 0.0, 1.0]])
    z0 = torch.tensor([[7.0], [0.0]])
    terms = composed_alignment_losses(mapped, [b1], [z1, z0])
    # to v1: squared errors (0, 0, 4) and (0, 4, 0) over 6 entries; to v0: B1 B2 z2 = [8, -1] vs [7, 0]
    assert [t.item() for t in terms] == pytest.approx([8 / 6, (1 + 1) / 2])
    with pytest.raises(ValueError, match="need 1 older maps"):
        composed_alignment_losses(mapped, [], [z1, z0])


# --------------------------------------------------------------------------- config and loading errors
def base_yaml(tmp_path, extra="", dim=16, classes=4, epochs=1):
    text = textwrap.dedent(f"""\
        arch_params: {{arch: CifarResNet20, num_classes: 5, embedding_dim: {dim}}}
        optimizer_params: {{algorithm: sgd, lr: 0.05, momentum: 0.9}}
        dataset_params: {{name: digits, num_classes: {classes}, num_workers: 0, batch_size: 64}}
        epochs: {epochs}
        label_smoothing: 0.1
        seed: 1
        output_model_path: {tmp_path}/new.pt
        output_dir: {tmp_path}/run
        runtime: {{progress: false, tensorboard: false}}
        """) + textwrap.dedent(extra)
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("extra, fragment", [
    ("backward_params: {previous_model_paths: [a.pt, b.pt], output_map_path: m.pt}",
     "2 previous_model_paths need 1 previous_map_paths"),
    ("backward_params: {previous_model_paths: [], output_map_path: m.pt}", "previous_model_paths is empty"),
    ("backward_params: {previous_model_paths: [a.pt], output_map_path: m.pt, weight: -1}",
     "backward_params.weight must be a finite number >= 0"),
    ("bct_params: {old_model_path: a.pt, influence_weight: .nan}", "bct_params.influence_weight"),
    ("bct_params: {old_model_path: ' '}", "bct_params.old_model_path is an empty path"),
    ("bct_params: {old_model_path: a.pt, lambda: 1}", "unknown key 'bct_params.lambda'"),
    ("bct_params: {old_model_path: a.pt, synthesised_rows: norm}", "bct_params.synthesised_rows"),
    ("backward_params: {previous_model_paths: [a.pt], output_map_path: TMP/new.pt}",
     "output_map_path equals output_model_path"),
])
def test_bad_compat_settings_name_the_key(tmp_path, extra, fragment):
    with pytest.raises(UserError) as e:
        load_config(BackboneConfig, base_yaml(tmp_path, extra.replace("TMP", str(tmp_path))))
    assert fragment in str(e.value)


def test_compat_with_ssl_is_refused(tmp_path):
    p = base_yaml(tmp_path, "ssl_params: {projection_dim: 8}\nbct_params: {old_model_path: a.pt}\n")
    with pytest.raises(UserError, match="bct_params needs supervised training"):
        load_config(BackboneConfig, p, ["label_smoothing=0.0"])


def save_backbone(path, dim=16, width=5, trained=None, **meta):
    torch.manual_seed(0)
    model = build_backbone("CifarResNet20", num_classes=width, embedding_dim=dim)
    if trained is not None:
        meta["trained_classes"] = trained
    save_model_file(path, model, kind="backbone", arch_params={"arch": "CifarResNet20", "num_classes": width,
                                                                 "embedding_dim": dim, "last_nonlin": True},
                    meta=meta)
    return model


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_old_classifier_rows_and_their_errors(tmp_path):
    probe = torch.zeros(1, 3, 8, 8)
    model = save_backbone(tmp_path / "old.pt", trained=2)
    _, rows, c_old = old_classifier_rows(tmp_path / "old.pt", 16, probe)
    assert c_old == 2 and torch.equal(rows, model.classifier.weight[:2].detach())
    save_backbone(tmp_path / "all.pt")  # no trained_classes in the meta: every row
    assert old_classifier_rows(tmp_path / "all.pt", 16, probe)[2] == 5
    with pytest.raises(UserError, match="gives 16-d embeddings but the new model 8-d"):
        old_classifier_rows(tmp_path / "old.pt", 8, probe)
    with pytest.raises(UserError, match="bct_params.old_model_path: model file .*missing.pt does not exist"):
        old_classifier_rows(tmp_path / "missing.pt", 16, probe)
    save_backbone(tmp_path / "ssl.pt", label_free=True)
    with pytest.raises(UserError, match="trained label-free"):
        old_classifier_rows(tmp_path / "ssl.pt", 16, probe)
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 16, 1), nn.AdaptiveAvgPool2d(1)))
    scripted.save(str(tmp_path / "ts.pt"))
    with pytest.raises(UserError, match="has no classifier"):
        old_classifier_rows(tmp_path / "ts.pt", 16, probe)


def test_quickstart_chain_configs_load():
    qs = os.path.join(REPO, "configs", "quickstart")
    names = ["v0"] + [f"v{v}_{m}" for v in (1, 2) for m in ("independent", "bct", "backward")]
    cfgs = {n: load_config(BackboneConfig, os.path.join(qs, f"digits_chain_{n}.yaml")) for n in names}
    assert [cfgs[n].dataset_params.num_classes for n in ("v0", "v1_bct", "v2_bct")] == [3, 6, 10]
    assert cfgs["v2_bct"].bct_params.old_model_path == cfgs["v1_bct"].output_model_path
    b2 = cfgs["v2_backward"].backward_params
    assert list(b2.previous_model_paths) == [cfgs["v1_backward"].output_model_path, cfgs["v0"].output_model_path]
    assert list(b2.previous_map_paths) == [cfgs["v1_backward"].backward_params.output_map_path]
    post = load_config(TransformationConfig, os.path.join(qs, "digits_chain_posthoc_backward.yaml"))
    assert post.arch_params.arch == "LINEAR" and post.objective_params.discriminative_loss is None
    assert post.old_model_path == cfgs["v1_independent"].output_model_path  # the newer model is the input
    assert post.new_model_path == cfgs["v0"].output_model_path


# --------------------------------------------------------------------------- end to end

def assert_user_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("rows_mode", [None, "mean"])
def test_bct_run_one_epoch(tmp_path, rows_mode):
    old = save_backbone(tmp_path / "old.pt", trained=2).eval()
    mode = "" if rows_mode is None else f", synthesised_rows: {rows_mode}"
    cfg = base_yaml(tmp_path, f"bct_params: {{old_model_path: {tmp_path}/old.pt, influence_weight: 0.5{mode}}}\n")
    r = run_script("train_backbone.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "4 old classifier rows (2 synthesised)" in r.stdout
    meta = read_model_file(tmp_path / "new.pt")["meta"]
    bct = meta["bct"]
    assert bct["old_model_path"] == f"{tmp_path}/old.pt" and bct["influence_weight"] == 0.5
    assert len(bct["old_sha256"]) == 64 and bct["old_trained_classes"] == 2 and bct["synthesised_classes"] == [2, 3]
    assert bct["synthesised_rows"] == (rows_mode or "scaled")
    load_model_file(tmp_path / "new.pt")
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train_loss"] == pytest.approx(line["train_task_loss"] + 0.5 * line["train_influence_loss"], rel=1e-4)
    # W_old': the old model's two trained rows, then the mean old feature of classes 2 and 3 (by hand),
    # by default rescaled to the trained rows' mean norm
    rows = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["extra"]["bct_classifier"]
    ds = build_dataset("digits", "", "train", augment=False, num_classes=4)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.as_tensor(ds.labels)
    with torch.no_grad():
        feats = old(images).embedding
    want = torch.stack([feats[labels == c].mean(0) for c in (2, 3)])
    trained = old.classifier.weight[:2].detach()
    if rows_mode is None:
        want = want / want.norm(dim=1, keepdim=True) * trained.norm(dim=1).mean()
    assert rows.shape == (4, 16)
    assert torch.equal(rows[:2], trained)
    assert torch.allclose(rows[2:], want, atol=1e-5)


@pytest.mark.slow
def test_backward_run_one_epoch(tmp_path):
    # v1: 16-d, v0: 12-d, B_1: 16 -> 12; the new version (v2) is 8-d, so B_2: 8 -> 16
    save_backbone(tmp_path / "v1.pt", dim=16)
    save_backbone(tmp_path / "v0.pt", dim=12)
    b1 = build_backward_map(16, 12)
    save_transformation(tmp_path / "B1.pt", b1, b1.arch_params())
    extra = f"""\
        backward_params:
          previous_model_paths: [{tmp_path}/v1.pt, {tmp_path}/v0.pt]
          previous_map_paths: [{tmp_path}/B1.pt]
          weight: 0.3
          output_map_path: {tmp_path}/B2.pt
        """
    cfg = base_yaml(tmp_path, extra, dim=8)
    r = run_script("train_backbone.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "backward map written to" in r.stdout
    head = read_model_file(tmp_path / "B2.pt")
    assert head["kind"] == "transformation" and head["arch_params"]["arch"] == "LINEAR"
    assert head["meta"]["backward_map"]["to_model_path"] == f"{tmp_path}/v1.pt"
    b2 = load_model_file(tmp_path / "B2.pt")
    assert map_features(b2, torch.zeros(3, 8)).shape == (3, 16)
    model = load_model_file(tmp_path / "new.pt")
    assert model.embedding_dim == 8
    rec = read_model_file(tmp_path / "new.pt")["meta"]["backward"]
    assert rec["previous_model_paths"] == [f"{tmp_path}/v1.pt", f"{tmp_path}/v0.pt"] and rec["weight"] == 0.3
    assert rec["previous_map_paths"] == [f"{tmp_path}/B1.pt"] and len(rec["previous_map_sha256"]) == 1
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train_align_loss"] == pytest.approx(line["train_align_loss_back1"] + line["train_align_loss_back2"],
                                                     rel=1e-4)
    assert line["train_loss"] == pytest.approx(line["train_task_loss"] + 0.3 * line["train_align_loss"], rel=1e-4)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("backward_map.") for k in state["model"])


def _state(path):
    return read_model_file(path)["state_dict"]


def test_backward_run_resumes_to_identical_weights(tmp_path, killed_after_first_epoch):
    import fct.training.backbone as tb

    save_backbone(tmp_path / "v0.pt", dim=12)
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
        extra = f"backward_params: {{previous_model_paths: [{tmp_path}/v0.pt], output_map_path: {tmp_path}/{name}/B.pt}}\n"
        base_yaml(tmp_path / name, extra, dim=8, classes=3, epochs=2)
    tb.train_backbone(load_config(BackboneConfig, tmp_path / "full" / "cfg.yaml"))

    cfg = load_config(BackboneConfig, tmp_path / "cut" / "cfg.yaml")
    with killed_after_first_epoch(), pytest.raises(KeyboardInterrupt):
        tb.train_backbone(cfg)
    assert not (tmp_path / "cut" / "B.pt").exists()
    tb.train_backbone(cfg)  # resumes at epoch 1: backbone and B_1 from the wrapper's checkpoint
    for f in ("new.pt", "B.pt"):
        a, b = _state(tmp_path / "full" / f), _state(tmp_path / "cut" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.slow
def test_compat_errors_exit_2(tmp_path):
    save_backbone(tmp_path / "v1.pt", dim=16)
    r = run_cli("train_backbone.py", "--config", str(base_yaml(tmp_path, f"bct_params: {{old_model_path: {tmp_path}/nope.pt}}\n")))
    assert_user_error(r, "bct_params.old_model_path", "nope.pt does not exist")
    b = build_backward_map(12, 16)  # the wrong way round: it must map v1 (16-d) to v0 (12-d)
    save_transformation(tmp_path / "B1.pt", b, b.arch_params())
    save_backbone(tmp_path / "v0.pt", dim=12)
    extra = (f"backward_params: {{previous_model_paths: [{tmp_path}/v1.pt, {tmp_path}/v0.pt], "
             f"previous_map_paths: [{tmp_path}/B1.pt], output_map_path: {tmp_path}/B2.pt}}\n")
    r = run_cli("train_backbone.py", "--config", str(base_yaml(tmp_path, extra)))
    assert_user_error(r, "backward_params.previous_map_paths[0]", "maps 12-d to 16-d")
    # (the embedding-width check of bct_params and the map count are covered in process above)
