"""Export for serving (fct.export): ONNX and TorchScript files of h and of the transformed old
model equal PyTorch on batch sizes other than the traced one; bad inputs fail in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import fct.export as export
from fct.cli import run_main
from fct.errors import RunError, UserError
from fct.export import export_model, needs_side_input
from fct.models import build_backbone, save_model_file, save_transformation, save_transformed_old_model
from fct.transformations import build_transformation
from helpers import one_error_line, run_cli, run_script

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

OLD, NEW, SIDE, INNER = 6, 5, 4, 16
BATCHES = (3, 7)  # neither is the traced batch (2) nor a verification batch of export_model (1, 5)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _trained_like(h: nn.Module, side_dim: int | None) -> nn.Module:
    """h with non-trivial BatchNorm running statistics (a few train-mode passes), in eval mode."""
    h.train()
    with torch.no_grad():
        for _ in range(3):
            h(torch.randn(16, OLD) * 2 + 1, None if side_dim is None else torch.randn(16, side_dim) - 1)
    return h.eval()


def _save_h(path: Path, arch: str, with_side: bool, sigma_dim: int = 1) -> nn.Module:
    side_dim = SIDE if with_side else None
    h = build_transformation(arch, old_embedding_dim=OLD, new_embedding_dim=NEW, side_info_dim=side_dim,
                             inner_dim=INNER, sigma_dim=sigma_dim)
    h = _trained_like(h, side_dim)
    meta = {"side_info_model_path": "side.pt" if with_side else None}
    save_transformation(path, h, h.arch_params(), meta=meta)
    return h


def _run_exported(fmt: str, file: Path,
                  inputs: dict[str, torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
    """Output names and outputs of an exported file, run outside fct."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(inputs)
        assert all(isinstance(i.shape[0], str) for i in session.get_inputs()), "batch is not dynamic"
        names = [o.name for o in session.get_outputs()]
        return names, session.run(None, {k: v.numpy() for k, v in inputs.items()})
    module = torch.jit.load(str(file))
    with torch.no_grad():
        outs = module(*inputs.values())
    return [], [o.numpy() for o in outs]


def _max_diff(got: list[np.ndarray], want: list[torch.Tensor]) -> float:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


HEADS = [("MLP_BN_SIDE_PROJECTION", 1), ("MLP_BN_SIDE_PROJECTION_SIGMA", 1),
         ("MLP_BN_SIDE_PROJECTION_SIGMA", NEW)]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("with_side", [False, True])
@pytest.mark.parametrize("arch,sigma_dim", HEADS)
def test_transformation_export_equals_pytorch(tmp_path, fmt: str, with_side: bool, arch: str,
                                              sigma_dim: int) -> None:
    h = _save_h(tmp_path / "h.pt", arch, with_side, sigma_dim)
    out = tmp_path / "served" / f"h.{fmt}"
    report = export_model(tmp_path / "h.pt", fmt, out)

    fastfill = arch.endswith("SIGMA")
    want_inputs = {"old": ["B", OLD], **({"side": ["B", SIDE]} if with_side else {})}
    want_outputs = {"feature": ["B", NEW], **({"log_variance": ["B", sigma_dim]} if fastfill else {})}
    assert report["inputs"] == want_inputs and report["outputs"] == want_outputs
    assert report["verification"]["ok"] and report["verification"]["batch_sizes"] == [1, 5]
    assert max(report["verification"]["max_abs_diff"].values()) <= 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left behind

    for batch in BATCHES:
        inputs = {"old": torch.randn(batch, OLD)}
        if with_side:
            inputs["side"] = torch.randn(batch, SIDE)
        with torch.no_grad():
            ref = h(inputs["old"], inputs.get("side"))
        want = [ref.feature] + ([ref.log_variance] if fastfill else [])
        names, got = _run_exported(fmt, out, inputs)
        if fmt == "onnx":
            assert names == list(want_outputs)
        assert _max_diff(got, want) <= 1e-4


def _save_transformed_old(tmp_path: Path, arch: str, meta: dict | None) -> nn.Module:
    backbone = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": OLD, "last_nonlin": True}
    old = build_backbone(**backbone).train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        old(torch.randn(8, 3, 8, 8))
    save_model_file(tmp_path / "old.pt", old.eval(), kind="backbone", arch_params=backbone)
    h = build_transformation(arch, old_embedding_dim=OLD, new_embedding_dim=NEW, inner_dim=INNER)
    h = _trained_like(h, None)
    return save_transformed_old_model(tmp_path / "old_transformed.pt", tmp_path / "old.pt", None, h,
                                      h.arch_params(), meta=meta)


@pytest.mark.parametrize("fmt,arch", [("onnx", "MLP_BN_SIDE_PROJECTION_SIGMA"),
                                      ("torchscript", "MLP_BN_SIDE_PROJECTION")])
def test_transformed_old_model_export_equals_pytorch(tmp_path, fmt: str, arch: str) -> None:
    model = _save_transformed_old(tmp_path, arch, meta={"image_size": 8})
    out = tmp_path / f"old_transformed.{fmt}"
    report = export_model(tmp_path / "old_transformed.pt", fmt, out)
    assert report["kind"] == "transformed_old" and report["inputs"] == {"images": ["B", 3, 8, 8]}
    fastfill = arch.endswith("SIGMA")
    assert list(report["outputs"]) == (["feature", "log_variance"] if fastfill else ["feature"])
    assert report["verification"]["ok"]
    for batch in BATCHES:
        images = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            feature, log_variance = model.embed_with_uncertainty(images)
        _, got = _run_exported(fmt, out, {"images": images})
        assert _max_diff(got, [feature] + ([log_variance] if fastfill else [])) <= 1e-4


def test_image_size_option_and_its_absence(tmp_path) -> None:
    _save_transformed_old(tmp_path, "MLP_BN_SIDE_PROJECTION", meta=None)
    path = tmp_path / "old_transformed.pt"
    with pytest.raises(UserError, match="does not record its image size.*--image-size"):
        export_model(path, "torchscript", tmp_path / "m.ts")
    report = export_model(path, "torchscript", tmp_path / "m.ts", image_size="12x8")
    assert report["inputs"] == {"images": ["B", 3, 12, 8]}
    for bad in ("0", "8x", "a", "8x8x8"):
        with pytest.raises(UserError, match="image size"):
            export_model(path, "torchscript", tmp_path / "n.ts", image_size=bad)
    assert not (tmp_path / "n.ts").exists()


def test_side_input_follows_the_training_record() -> None:
    # recorded: a side-information model was (not) used, whatever the widths
    assert needs_side_input({"old_embedding_dim": 6, "side_info_dim": 6}, {"side_info_model_path": "s.pt"})
    assert not needs_side_input({"old_embedding_dim": 6, "side_info_dim": 6}, {"side_info_model_path": None})
    # not recorded: only a side branch that cannot take the old feature needs its own input
    assert needs_side_input({"old_embedding_dim": 6, "side_info_dim": 4}, {})
    assert not needs_side_input({"old_embedding_dim": 6, "side_info_dim": None}, {})


def test_bad_inputs_are_user_errors(tmp_path) -> None:
    _save_h(tmp_path / "h.pt", "MLP_BN_SIDE_PROJECTION", with_side=False)
    backbone = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": OLD}
    save_model_file(tmp_path / "old.pt", build_backbone(**backbone), kind="backbone", arch_params=backbone)
    (tmp_path / "notes.txt").write_text("not a model\n")
    cases = [(tmp_path / "missing.pt", "onnx", "does not exist"),
             (tmp_path / "old.pt", "onnx", "kind 'backbone'"),
             (tmp_path / "notes.txt", "torchscript", "not a model file"),
             (tmp_path / "h.pt", "tflite", "unknown export format")]
    for model, fmt, message in cases:
        with pytest.raises(UserError, match=message):
            export_model(model, fmt, tmp_path / "out.bin")
    with pytest.raises(UserError, match="would destroy the input"):
        export_model(tmp_path / "h.pt", "onnx", tmp_path / "h.pt")
    with pytest.raises(UserError, match="opset"):
        export_model(tmp_path / "h.pt", "onnx", tmp_path / "out.bin", opset=11)
    assert not (tmp_path / "out.bin").exists()


def test_check_refuses_a_failed_verification_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    _save_h(tmp_path / "h.pt", "MLP_BN_SIDE_PROJECTION_SIGMA", with_side=True)
    out = tmp_path / "h.ts"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no export can pass
    argv = ["--model", str(tmp_path / "h.pt"), "--format", "torchscript", "--out", str(out)]
    with pytest.raises(RunError, match="verification failed"):
        export_model(tmp_path / "h.pt", "torchscript", out, check=True)
    assert run_main(export.main, [*argv, "--check"]) == 1
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.pt", "h.ts"]
    assert one_error_line(capsys.readouterr().err).startswith("error: verification failed")
    # without --check the export is written and the failure reported
    assert run_main(export.main, argv) == 0
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "--check" in captured.err
    assert out.read_bytes() != b"previous export"


@pytest.mark.slow
def test_cli_end_to_end(tmp_path) -> None:
    _save_h(tmp_path / "h.pt", "MLP_BN_SIDE_PROJECTION_SIGMA", with_side=True)
    result = run_script("-m", "fct.export", "--model", str(tmp_path / "h.pt"), "--format", "onnx",
                        "--out", str(tmp_path / "h.onnx"), "--check")
    assert result.returncode == 0, result.stderr
    assert "inputs: old (B, 6), side (B, 4); outputs: feature (B, 5), log_variance (B, 1)" in result.stdout
    assert "verification: onnxruntime vs PyTorch on batches of 1, 5 (traced at 2)" in result.stdout
    assert result.stdout.rstrip().endswith(": ok") and (tmp_path / "h.onnx").is_file()


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(tmp_path) -> None:
    _save_h(tmp_path / "h.pt", "MLP_BN_SIDE_PROJECTION", with_side=False)
    backbone = {"arch": "CifarResNet20", "num_classes": 10, "embedding_dim": OLD}
    save_model_file(tmp_path / "old.pt", build_backbone(**backbone), kind="backbone", arch_params=backbone)
    (tmp_path / "notes.txt").write_text("not a model\n")
    cases = [("missing.pt", "out.onnx", "does not exist"), ("old.pt", "out.onnx", "kind 'backbone'"),
             ("notes.txt", "out.onnx", "not a model file"), ("h.pt", "h.pt", "would destroy the input")]
    for model, out, message in cases:
        result = run_cli("-m", "fct.export", "--model", str(tmp_path / model), "--format", "onnx",
                         "--out", str(tmp_path / out))
        assert result.returncode == 2, result.stderr
        assert message in one_error_line(result.stderr)
    assert not (tmp_path / "out.onnx").exists()
