"""Backbones (shapes, embedding width, last ReLU, torchvision equivalence) and model files."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
import torch.nn as nn
import torchvision

from fct.errors import ConfigError, UserError
from fct.models import (
    BACKBONES,
    MODEL_KINDS,
    BackboneOutput,
    ScriptedEmbeddingModel,
    backbone_arch_params,
    build_backbone,
    is_torchscript_file,
    load_model_file,
    model_num_params,
    probe_model,
    read_model_file,
    save_model_file,
)

ALL_ARCHS = ["ResNet18", "ResNet50", "ResNet101", "WideResNet50_2", "WideResNet101_2",
             "CifarResNet18", "CifarResNet50", "CifarResNet20", "CifarResNet32", "CifarResNet56"]
SMALL_CIFAR_ARCHS = ["CifarResNet20", "CifarResNet32", "CifarResNet56"]
# The reference distributes TorchScript files; building test fixtures needs the deprecated jit API.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_lists_every_arch() -> None:
    assert sorted(ALL_ARCHS) == BACKBONES.names()


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="ResNet50") as info:
        build_backbone("ResNet51", num_classes=10)
    assert "CifarResNet20" in str(info.value)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"num_classes": 10, "embedding_dim": -1},
                                 {"num_classes": 10, "last_nonlin": "yes"}, {"num_classes": 2.5}])
def test_bad_arch_params_raise_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError, match="arch_params"):
        build_backbone("CifarResNet20", **bad)


# Forward shapes. The largest nets only build (param counts are checked against torchvision below).
@pytest.mark.parametrize("arch,size", [("ResNet18", 64), ("ResNet50", 64),
                                       ("CifarResNet18", 32), ("CifarResNet50", 32),
                                       ("CifarResNet20", 32), ("CifarResNet32", 32), ("CifarResNet56", 32)])
def test_forward_shapes_and_attributes(arch: str, size: int) -> None:
    model = build_backbone(arch, num_classes=7, embedding_dim=24).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        feats = model.features(x)
    assert isinstance(out, BackboneOutput)
    assert out.embedding.shape == (2, 24) and out.logits.shape == (2, 7)
    assert torch.equal(feats, out.embedding)
    assert model.embedding_dim == 24 and model.num_classes == 7
    clf = model.get_submodule("classifier")
    assert isinstance(clf, nn.Linear) and clf.bias is None
    assert clf.weight.shape == (7, 24)
    torch.testing.assert_close(out.logits, out.embedding @ clf.weight.T)
    assert backbone_arch_params(model) == {"arch": arch, "num_classes": 7, "embedding_dim": 24,
                                           "last_nonlin": True}


@pytest.mark.parametrize("arch,default_dim", [("ResNet18", 512), ("ResNet50", 2048), ("CifarResNet18", 512),
                                              ("CifarResNet20", 64), ("CifarResNet56", 64)])
def test_embedding_dim_none_keeps_usual_width(arch: str, default_dim: int) -> None:
    model = build_backbone(arch, num_classes=3, embedding_dim=None)
    assert model.embedding_dim == default_dim
    assert model.classifier.weight.shape == (3, default_dim)


@pytest.mark.parametrize("arch", ["ResNet18", "ResNet50", "CifarResNet20"])
def test_last_nonlin(arch: str) -> None:
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    with_relu = build_backbone(arch, num_classes=5, embedding_dim=16, last_nonlin=True).eval()
    torch.manual_seed(1)
    no_relu = build_backbone(arch, num_classes=5, embedding_dim=16, last_nonlin=False).eval()
    no_relu.load_state_dict(with_relu.state_dict())  # same weights: only the last ReLU differs
    with torch.no_grad():
        e_relu, e_lin = with_relu.features(x), no_relu.features(x)
    assert (e_relu >= 0).all()
    assert (e_lin < 0).any()
    # Only the last block's output ReLU is switched off: every other block keeps its ReLU.
    relu_flags = [m.relu_out for m in no_relu.modules() if hasattr(m, "relu_out")]
    assert relu_flags[-1] is False and all(relu_flags[:-1])


def test_cifar_resnet20_on_8x8_and_depths() -> None:
    model = build_backbone("CifarResNet20", num_classes=10, embedding_dim=32).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 8, 8))
    assert out.embedding.shape == (3, 32) and out.logits.shape == (3, 10)
    for arch, n in zip(SMALL_CIFAR_ARCHS, (3, 5, 9)):
        m = build_backbone(arch, num_classes=10)
        assert [len(m.layer1), len(m.layer2), len(m.layer3)] == [n, n, n]
        assert not hasattr(m, "layer4")
        n_convs = sum(isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) for c in m.modules())
        assert n_convs + 1 == 6 * n + 2  # 3x3 convs + the classifier = the nominal depth
    # ResNet-20 by hand: stem conv, 3x3 convs of the stages, BN gammas/betas, the two 1x1
    # projection shortcuts (+BN), the 64->10 classifier.
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 + 5 * 32 * 32) * 9 + (32 * 64 + 5 * 64 * 64) * 9
    bns = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    shortcuts = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert model_num_params(build_backbone("CifarResNet20", num_classes=10)) == convs + bns + shortcuts + 640


@pytest.mark.parametrize("arch,tv", [("ResNet18", torchvision.models.resnet18),
                                     ("ResNet50", torchvision.models.resnet50)])
def test_same_network_as_torchvision(arch: str, tv) -> None:
    """embedding_dim=None, last_nonlin=True is torchvision's ResNet (classifier without bias)."""
    ours = build_backbone(arch, num_classes=10).eval()
    ref = tv(num_classes=10).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    state["classifier.weight"] = ref.fc.weight.detach()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x) - ref.fc.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,tv", [("ResNet101", torchvision.models.resnet101),
                                     ("WideResNet50_2", torchvision.models.wide_resnet50_2),
                                     ("WideResNet101_2", torchvision.models.wide_resnet101_2)])
def test_large_nets_param_counts(arch: str, tv) -> None:
    with torch.device("meta"):  # no memory, no init: only shapes matter here
        ours = build_backbone(arch, num_classes=1000)
        ref = tv()
    assert model_num_params(ours) == model_num_params(ref) - 1000  # torchvision's fc bias
    assert set(ours.state_dict()) - {"classifier.weight"} == set(ref.state_dict()) - {"fc.weight", "fc.bias"}


def test_embedding_block_matches_reference_layout() -> None:
    """The last block outputs embedding_dim directly (hand-counted from the reference layout).

    ResNet50-128: the last bottleneck keeps its 512-wide 1x1/3x3 convs; conv3 is 512->128 and a
    2048->128 1x1 projection (+BN) becomes its shortcut. ResNet18-128: both 3x3 convs of the last
    basic block are 128 wide (512->128, 128->128), shortcut 512->128.
    """
    r50 = build_backbone("ResNet50", num_classes=100, embedding_dim=128)
    last = r50.layer4[2]
    assert last.conv1.out_channels == 512 and last.conv2.out_channels == 512
    assert last.conv3.out_channels == 128 and last.downsample[0].weight.shape == (128, 2048, 1, 1)
    standard_last = 2048 * 512 + 1024 + 512 * 512 * 9 + 1024 + 512 * 2048 + 4096
    embedding_last = 2048 * 512 + 1024 + 512 * 512 * 9 + 1024 + 512 * 128 + 256 + 2048 * 128 + 256
    tv50 = model_num_params(torchvision.models.resnet50()) - 2048 * 1000 - 1000
    assert model_num_params(r50) == tv50 - standard_last + embedding_last + 128 * 100 == 22_796_352

    r18 = build_backbone("ResNet18", num_classes=100, embedding_dim=128)
    last = r18.layer4[1]
    assert (last.conv1.in_channels, last.conv1.out_channels, last.conv2.out_channels) == (512, 128, 128)
    assert model_num_params(r18) == 7_272_256
    c20 = build_backbone("CifarResNet20", num_classes=10, embedding_dim=128)
    assert c20.layer3[2].conv1.out_channels == 128 and c20.layer3[2].downsample is not None


def test_backward_and_channels_last() -> None:
    model = build_backbone("CifarResNet20", num_classes=10, embedding_dim=16).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = model(x)
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------

def _small_model(**kw) -> nn.Module:
    params = {"arch": "CifarResNet20", "num_classes": 5, "embedding_dim": 12, "last_nonlin": True, **kw}
    model = build_backbone(**params)
    # Make BN statistics non-trivial so the round trip checks buffers too.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_round_trip_identical_outputs(tmp_path) -> None:
    model = _small_model()
    path = tmp_path / "m.pt"
    save_model_file(path, model, kind="backbone", arch_params=backbone_arch_params(model), meta={"epoch": 3})
    loaded = load_model_file(path)
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits)
    raw = read_model_file(path)
    assert raw["format"] == "fct-model" and raw["format_version"] == 1 and raw["kind"] == "backbone"
    assert raw["meta"] == {"epoch": 3} and raw["arch_params"]["arch"] == "CifarResNet20"
    assert not [p for p in os.listdir(tmp_path) if p != "m.pt"]  # no temporary file left behind
    torch.load(path, weights_only=True)  # loadable with plain torch too


def test_loading_uses_weights_only(tmp_path, monkeypatch) -> None:
    model = _small_model()
    path = tmp_path / "m.pt"
    save_model_file(path, model, kind="backbone", arch_params=backbone_arch_params(model))
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model_file(path)
    assert seen == [True]


class _Payload:  # a custom class: unpickling it would need code
    pass


def test_file_needing_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "fct-model", "format_version": 1, "kind": "backbone", "arch_params": {},
                "state_dict": {}, "meta": {"x": _Payload()}}, path)
    with pytest.raises(UserError, match=r"evil\.pt is not a safe model file.*_Payload"):
        load_model_file(path)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path) -> None:
    model = _small_model()

    class Wrapper(nn.Module):  # stands for DDP: its state dict keys start with 'module.'
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    path = tmp_path / "m.pt"
    save_model_file(path, Wrapper(model), kind="backbone", arch_params=backbone_arch_params(model))
    keys = list(read_model_file(path)["state_dict"])
    assert keys and not any(k.startswith(("module.", "_orig_mod.")) for k in keys)

    # A hand-made file with prefixed keys loads too.
    raw = read_model_file(path)
    raw["state_dict"] = {f"_orig_mod.module.{k}": v for k, v in raw["state_dict"].items()}
    torch.save(raw, tmp_path / "prefixed.pt")
    loaded = load_model_file(tmp_path / "prefixed.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_torch_compile_wrapper_is_unwrapped(tmp_path) -> None:
    model = _small_model()
    compiled = torch.compile(model)  # compiles lazily: saving never runs it
    path = tmp_path / "c.pt"
    save_model_file(path, compiled, kind="backbone", arch_params=backbone_arch_params(model))
    assert "conv1.weight" in read_model_file(path)["state_dict"]


class _SideInfo(nn.Module):
    """Like the reference side-information models: (N, 3, H, W) -> (N, 128, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 128, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3), keepdim=True)


class _RefBackbone(nn.Module):
    """The reference export layout: a wrapper whose 'model' returns (logits, feature (N,D,1,1))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=1)
        self.fc = nn.Conv2d(6, 4, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.conv(x).mean(dim=(2, 3), keepdim=True)
        return self.fc(feature).flatten(1), feature


class _RefExport(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _RefBackbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, feature = self.model(x)
        return feature


class _TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.mean(dim=(2, 3), keepdim=True)
        return f, f.sum(1)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_side_info_file(tmp_path, how: str) -> None:
    net = _SideInfo().eval()
    x = torch.randn(2, 3, 16, 16)
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, x)
    path = tmp_path / "side.pt"
    torch.jit.save(scripted, str(path))
    assert is_torchscript_file(path)
    loaded = load_model_file(path)
    assert isinstance(loaded, ScriptedEmbeddingModel) and not loaded.training
    with torch.no_grad():
        out = loaded(x)
    assert out.logits is None and out.embedding.shape == (2, 128)
    torch.testing.assert_close(out.embedding, net(x).flatten(1))
    assert loaded.classifier is None
    with pytest.raises(UserError, match="TorchScript"):
        read_model_file(path)


def test_torchscript_reference_backbone_exposes_classifier(tmp_path) -> None:
    ref = _RefExport().eval()
    path = tmp_path / "ref.pt"
    torch.jit.save(torch.jit.script(ref), str(path))
    loaded = load_model_file(path)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        emb = loaded(x).embedding
        logits, _ = ref.model(x)
    assert emb.shape == (3, 6) and loaded.embedding_dim == 6 and loaded.num_classes == 4
    assert isinstance(loaded.classifier, nn.Linear) and loaded.classifier.bias is None
    assert not loaded.classifier.weight.requires_grad
    torch.testing.assert_close(loaded.classifier(emb), logits)


def test_torchscript_tuple_output_takes_first(tmp_path) -> None:
    path = tmp_path / "tuple.pt"
    torch.jit.save(torch.jit.script(_TupleOut()), str(path))
    out = load_model_file(path)(torch.randn(2, 3, 4, 4))
    assert out.embedding.shape == (2, 3)


def test_plain_torch_save_is_not_torchscript(tmp_path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(1)}, path)
    assert zipfile.is_zipfile(path) and not is_torchscript_file(path)


def _write_error_cases(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, regex the error must match). Every message must also name the file."""
    cases: dict[str, tuple[str, str]] = {}
    cases["missing"] = (str(tmp_path / "nope.pt"), "does not exist")
    p = tmp_path / "random.bin"
    p.write_bytes(bytes(range(256)) * 4)
    cases["random"] = (str(p), "not a model file")
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"arch": "ResNet50"}))
    cases["json"] = (str(p), "JSON")
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    cases["empty"] = (str(p), "empty")
    p = tmp_path / "state_dict.pt"
    torch.save(_small_model().state_dict(), p)
    cases["state_dict"] = (str(p), "plain state_dict")
    p = tmp_path / "ckpt.pt"
    torch.save({"format": "fct-checkpoint", "model": {}, "epoch": 1}, p)
    cases["other_format"] = (str(p), "'fct-checkpoint'")
    p = tmp_path / "train_ckpt.pt"
    torch.save({"model": {}, "optimizer": {}, "epoch": 4}, p)
    cases["checkpoint"] = (str(p), "training checkpoint")
    p = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), p)
    cases["tensor"] = (str(p), "single tensor")
    p = tmp_path / "future.pt"
    torch.save({"format": "fct-model", "format_version": 99}, p)
    cases["version"] = (str(p), "format_version 99")
    p = tmp_path / "corrupt_script.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x/code/__torch__.py", "garbage")
        zf.writestr("x/constants.pkl", b"garbage")
    cases["corrupt_torchscript"] = (str(p), "TorchScript")
    d = tmp_path / "adir"
    d.mkdir()
    cases["directory"] = (str(d), "directory")
    return cases


def test_error_cases_raise_user_error_naming_the_file(tmp_path) -> None:
    for name, (path, pattern) in _write_error_cases(tmp_path).items():
        with pytest.raises(UserError, match=pattern) as info:
            load_model_file(path)
        message = str(info.value)
        assert path in message, name
        assert "\n" not in message, name


def _saved(tmp_path) -> tuple[str, dict]:
    model = _small_model()
    path = tmp_path / "m.pt"
    save_model_file(path, model, kind="backbone", arch_params=backbone_arch_params(model))
    return str(path), read_model_file(path)


def test_state_dict_mismatch_names_keys(tmp_path) -> None:
    path, raw = _saved(tmp_path)
    raw["arch_params"]["embedding_dim"] = 20  # the stored weights are 12 wide
    torch.save(raw, path)
    with pytest.raises(UserError, match=r"m\.pt: state_dict does not match .*shape mismatch: layer3\.2\.conv1"):
        load_model_file(path)

    path, raw = _saved(tmp_path)
    raw["state_dict"]["extra.weight"] = torch.zeros(1)
    del raw["state_dict"]["classifier.weight"]
    torch.save(raw, path)
    with pytest.raises(UserError, match=r"missing keys: classifier\.weight; unexpected keys: extra\.weight"):
        load_model_file(path)

    path, raw = _saved(tmp_path)
    raw["arch_params"]["arch"] = "ResNet18"
    torch.save(raw, path)
    with pytest.raises(UserError, match=r"m\.pt: .*arch 'ResNet18'.*missing keys: layer4"):
        load_model_file(path)


def test_bad_kind_and_arch_params_name_the_file(tmp_path) -> None:
    path, raw = _saved(tmp_path)
    raw["kind"] = "nonsense"
    torch.save(raw, path)
    with pytest.raises(UserError, match=r"m\.pt: unknown model kind 'nonsense'.*backbone"):
        load_model_file(path)

    path, raw = _saved(tmp_path)
    raw["arch_params"]["depth"] = 3
    torch.save(raw, path)
    with pytest.raises(UserError, match=r"m\.pt: unknown arch_params key\(s\) depth"):
        load_model_file(path)

    path, raw = _saved(tmp_path)
    raw["arch_params"]["arch"] = "ResNet7"
    torch.save(raw, path)
    with pytest.raises(UserError, match=r"m\.pt: unknown backbone architecture 'ResNet7'"):
        load_model_file(path)


def test_save_rejects_values_that_would_need_pickling(tmp_path) -> None:
    model = _small_model()
    with pytest.raises(TypeError, match=r"meta\.cfg"):
        save_model_file(tmp_path / "m.pt", model, kind="backbone", arch_params=backbone_arch_params(model),
                        meta={"cfg": _Payload()})
    with pytest.raises(ConfigError, match="model kind"):
        save_model_file(tmp_path / "m.pt", model, kind="nope", arch_params={})
    assert not (tmp_path / "m.pt").exists()


def test_model_kinds_registry_is_generic() -> None:
    assert "backbone" in MODEL_KINDS
    model = MODEL_KINDS.get("backbone")({"arch": "CifarResNet20", "num_classes": 3})
    assert model.embedding_dim == 64


def test_load_to_map_location(tmp_path) -> None:
    path, _ = _saved(tmp_path)
    loaded = load_model_file(path, map_location=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: map_location='cuda' not exercised")
    on_gpu = load_model_file(path, map_location="cuda")
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())


# --------------------------------------------------------------------------------------------
# Probing foreign (TorchScript) models with the data's images
# --------------------------------------------------------------------------------------------


class _OneRow(nn.Module):
    """Takes images but answers one row for the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(0, 2, 3)).unsqueeze(0)


def _scripted(tmp_path, module: nn.Module, name: str) -> str:
    path = tmp_path / name
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def test_probe_refuses_a_torchscript_model_that_does_not_take_the_images(tmp_path) -> None:
    path = _scripted(tmp_path, nn.Linear(10, 5), "unrelated.pt")  # not an image model
    load_model_file(path)  # without an example input nothing is run
    for example in (torch.zeros(3, 8, 8), torch.zeros(5, 3, 8, 8)):
        with pytest.raises(UserError) as info:
            load_model_file(path, example_input=example)
        message = str(info.value)
        assert message.startswith(f"{path} does not take the data's images: on a batch of shape (2, 3, 8, 8) "
                                  "it fails with RuntimeError: mat1 and mat2 shapes cannot be multiplied"), \
            message
        assert "\n" not in message and "TorchScript interpreter" not in message


def test_probe_refuses_wrong_batch_size_and_accepts_a_fitting_model(tmp_path) -> None:
    path = _scripted(tmp_path, _OneRow(), "one_row.pt")
    with pytest.raises(UserError, match=r"one_row\.pt: on a batch of shape \(2, 3, 4, 4\) the model returns "
                                        r"embeddings of shape \(1, 3\), expected \(2, D\)"):
        load_model_file(path, example_input=torch.zeros(3, 4, 4))
    good = load_model_file(_scripted(tmp_path, _SideInfo(), "side.pt"), example_input=torch.zeros(1, 3, 8, 8))
    assert not good.training and good(torch.zeros(1, 3, 8, 8)).embedding.shape == (1, 128)


def test_probe_model_keeps_mode_and_grad_state() -> None:
    model = ScriptedEmbeddingModel(torch.jit.script(_SideInfo())).train()
    probe_model(model, torch.randn(3, 6, 6), "side.pt")
    assert model.training and all(p.grad is None for p in model.parameters())


def test_own_model_files_are_not_probed(tmp_path, monkeypatch) -> None:
    path, _ = _saved(tmp_path)
    monkeypatch.setattr("fct.models.model_file.probe_model",
                        lambda *a: pytest.fail("probed an fct model file"))
    load_model_file(path, example_input=torch.zeros(3, 8, 8))
