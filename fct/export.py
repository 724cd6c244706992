"""Export a transformation h, or a transformed old model (old backbone + h), for serving.

Formats:

``onnx``
    ``torch.onnx.export(dynamo=True)`` (the ``torch.export`` based exporter, which needs
    ``onnxscript``) with a dynamic batch dimension given as ``dynamic_shapes``; the same call and
    arguments work on torch 2.11 and 2.14. Default opset 18, which both versions write as is and
    every current ONNX runtime reads (2.14 alone would default to 20).
``torchscript``
    ``torch.jit.trace`` of the same wrapper. Nothing in h or the backbones depends on the batch
    size, so the traced graph takes any batch; the verification below proves it on each export.

Names of the exported graph (B is dynamic):

- a transformation: inputs ``old`` (B, d_old) and, only when h was trained with a separate
  side-information model, ``side`` (B, d_side); outputs ``feature`` (B, d_new) and, for a FastFill
  head, ``log_variance`` (B, sigma_dim);
- a transformed old model: input ``images`` (B, 3, H, W) with H, W fixed at export (the file's
  ``meta.image_size`` or the ``image_size`` argument); the same outputs.

Every export is verified: the written file is run (onnxruntime, or the reloaded TorchScript
module) against the PyTorch model on random batches of sizes other than the traced one, and the
largest absolute difference of each output is reported. The file is written to a temporary name
beside the target and renamed only after the check; with ``check=True`` a difference above the
tolerance raises RunError (exit code 1) and nothing is written.

Command line::

    python -m fct.export --model FILE --format onnx|torchscript --out OUT
                         [--opset N] [--image-size H[xW]] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from fct.errors import RunError, UserError
from fct.io import atomic_write
from fct.models import load_model_file, read_model_file
from fct.outputs import check_outputs

PathLike = Union[str, os.PathLike]

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
TRACE_BATCH = 2  # not 1: torch.export specialises a dimension of size 1 to a constant
VERIFY_BATCHES = (1, 5)


class _TransformationGraph(nn.Module):
    """h with plain tensor inputs and a tuple of tensor outputs (what exporters take)."""

    def __init__(self, h: nn.Module, with_side: bool) -> None:
        super().__init__()
        self.h = h
        self.with_side = with_side

    def forward(self, old: torch.Tensor, side: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """(B, d_old)[, (B, d_side)] -> (feature (B, d_new)[, log_variance (B, sigma_dim)])."""
        out = self.h(old, side if self.with_side else None)
        return (out.feature,) if out.log_variance is None else (out.feature, out.log_variance)


class _ImageGraph(nn.Module):
    """A transformed old model: images -> (feature[, log_variance])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> (feature (B, d_new)[, log_variance (B, sigma_dim)])."""
        out = self.model.transform(images)
        return (out.feature,) if out.log_variance is None else (out.feature, out.log_variance)


def needs_side_input(arch_params: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """Whether a transformation file's h takes features of a separate side-information model.

    fct training records ``meta.side_info_model_path`` (None: the side branch takes the old
    feature). A file without that record takes a side input when ``side_info_dim`` is set and
    differs from the old width (the side branch cannot take the old feature then)."""
    if "side_info_model_path" in meta:
        return meta["side_info_model_path"] is not None
    side = arch_params.get("side_info_dim")
    return side is not None and side != arch_params.get("old_embedding_dim")


def parse_image_size(value: Any) -> tuple[int, int]:
    """``32``, ``"32"``, ``"32x48"``, ``[32, 48]`` -> (H, W); UserError on anything else."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"image size {value!r} is not H or HxW (e.g. 32 or 32x48)") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = [value[0], value[0]]
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise UserError(f"image size {value!r} is not H or HxW with positive integers")
    return int(value[0]), int(value[1])


def _graph_and_inputs(path: Path, image_size: Optional[Any]) -> tuple[nn.Module, dict[str, tuple[int, ...]],
                                                                    list[str], str]:
    """The exportable module of a model file, its input shapes per name (batch dimension left
    out), its output names and the file's kind."""
    data = read_model_file(path)  # missing, non-PyTorch and non-fct files fail here in one line
    kind, arch_params, meta = data["kind"], data["arch_params"], data["meta"]
    if kind not in ("transformation", "transformed_old"):
        raise UserError(f"{path} is a model file of kind {kind!r}; export takes a transformation (kind "
                        "'transformation') or a transformed old model (kind 'transformed_old')")
    model = load_model_file(path).eval()
    h = model if kind == "transformation" else model.transformation
    outputs = ["feature", "log_variance"] if h.has_uncertainty else ["feature"]
    if kind == "transformation":
        with_side = needs_side_input(arch_params, meta)
        inputs = {"old": (h.old_embedding_dim,)}
        if with_side:
            inputs["side"] = (h.side_info_dim,)
        return _TransformationGraph(h, with_side).eval(), inputs, outputs, kind
    if image_size is None:
        if meta.get("image_size") is None:
            raise UserError(f"{path} does not record its image size (meta.image_size); give it with "
                            "--image-size H or HxW")
        image_size = meta["image_size"]
    height, width = parse_image_size(image_size)
    return _ImageGraph(model).eval(), {"images": (3, height, width)}, outputs, kind


def _random_inputs(shapes: Mapping[str, tuple[int, ...]], batch: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn((batch, *shape), generator=gen) for shape in shapes.values())


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return line if len(line) <= 300 else line[:297] + "..."


def _write_onnx(graph: nn.Module, example: tuple[torch.Tensor, ...], inputs: Sequence[str],
                outputs: Sequence[str], opset: int, tmp: str) -> None:
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it; say so before it fails deep inside
    except ImportError:
        raise UserError("--format onnx needs the onnxscript package (pip install onnxscript)") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # one Dim shared by every input is reported as 'will not be used' for all but the first name
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        torch.onnx.export(graph, example, tmp, dynamo=True, input_names=list(inputs),
                          output_names=list(outputs), dynamic_shapes=tuple({0: batch} for _ in inputs),
                          opset_version=opset, external_data=False, verbose=False)


def _write_torchscript(graph: nn.Module, example: tuple[torch.Tensor, ...], tmp: str) -> None:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream, but it is still a serving format; the shape checks of
        # the heads become constants in the trace (TracerWarning), which the verification covers.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, tmp)


def _runner(fmt: str, file: str, inputs: Sequence[str]) -> Any:
    """tuple of input tensors -> list of output arrays (float64 numpy), run from the written file."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError("verifying an ONNX export needs the onnxruntime package "
                            "(pip install onnxruntime)") from None
        session = onnxruntime.InferenceSession(file, providers=["CPUExecutionProvider"])

        def run_onnx(xs: tuple[torch.Tensor, ...]) -> list[Any]:
            feeds = {name: x.numpy() for name, x in zip(inputs, xs)}
            return [o.astype("float64") for o in session.run(None, feeds)]
        return run_onnx
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        loaded = torch.jit.load(file, map_location="cpu")

    def run(xs: tuple[torch.Tensor, ...]) -> list[Any]:
        with torch.no_grad():
            return [o.double().numpy() for o in loaded(*xs)]
    return run


def verify(graph: nn.Module, fmt: str, file: str, shapes: Mapping[str, tuple[int, ...]],
           outputs: Sequence[str], batches: Sequence[int] = VERIFY_BATCHES, seed: int = 0) -> dict[str, Any]:
    """Max absolute difference of each output between the exported ``file`` and ``graph`` (PyTorch)
    over random batches of each size in ``batches``; shapes are checked too."""
    import numpy as np

    run = _runner(fmt, file, list(shapes))
    gen = torch.Generator().manual_seed(seed)
    worst = {name: 0.0 for name in outputs}
    for batch in batches:
        xs = _random_inputs(shapes, batch, gen)
        with torch.no_grad():
            want = [t.double().numpy() for t in graph(*xs)]
        got = run(xs)
        if len(got) != len(want):
            raise RunError(f"{file}: the export returns {len(got)} outputs, PyTorch {len(want)}")
        for name, g, w in zip(outputs, got, want):
            if g.shape != w.shape:
                raise RunError(f"{file}: output {name} has shape {tuple(g.shape)} on a batch of {batch}, "
                               f"PyTorch {tuple(w.shape)}")
            worst[name] = max(worst[name], float(np.abs(g - w).max()))
    return {"batch_sizes": list(batches), "max_abs_diff": worst, "tolerance": TOLERANCE,
            "ok": all(v <= TOLERANCE for v in worst.values())}


def export_model(path: PathLike, fmt: str, out: PathLike, *, opset: int = DEFAULT_OPSET,
                 image_size: Optional[Any] = None, check: bool = False) -> dict[str, Any]:
    """Export the transformation or transformed old model in fct model file ``path`` to ``out``.

    fmt: 'onnx' or 'torchscript'. image_size: H, (H, W) or 'HxW' for a transformed old model
    (default: the file's ``meta.image_size``). Returns a report: format, kind, input and output
    shapes ('B' for the dynamic batch), opset (ONNX), and the verification (batch sizes, max
    absolute difference per output, ok). With ``check`` a failed verification raises RunError and
    leaves ``out`` untouched.
    """
    path, out = Path(path), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx" and not (isinstance(opset, int) and opset >= 18):
        raise UserError(f"--opset must be an integer >= 18 for the dynamo ONNX exporter, got {opset!r}")
    check_outputs({"--out": out}, inputs={"--model": path})
    graph, shapes, outputs, kind = _graph_and_inputs(path, image_size)
    example = _random_inputs(shapes, TRACE_BATCH, torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            graph(*example)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a backbone that does not take this image size fails in any way
        raise UserError(f"{path} does not take inputs of shapes {[tuple(x.shape) for x in example]}: "
                        f"{_first_line(e)}") from None

    checked: dict[str, Any] = {}

    def write(tmp: str) -> None:
        try:
            if fmt == "onnx":
                _write_onnx(graph, example, list(shapes), outputs, opset, tmp)
            else:
                _write_torchscript(graph, example, tmp)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters fail in many ways; one line, not a traceback
            other = "torchscript" if fmt == "onnx" else "onnx"
            raise UserError(f"{path}: export to {fmt} failed ({_first_line(e)}); "
                            f"--format {other} may work") from None
        checked.update(verify(graph, fmt, tmp, shapes, outputs))
        if check and not checked["ok"]:
            diffs = ", ".join(f"{k} {v:.3g}" for k, v in checked["max_abs_diff"].items())
            raise RunError(f"verification failed: the {fmt} export differs from PyTorch by {diffs} "
                           f"(tolerance {TOLERANCE:g}); {out} not written")

    atomic_write(out, write)  # the file appears only once written (and, with check, verified)

    def named(shape_of: Mapping[str, tuple[int, ...]]) -> dict[str, list[Any]]:
        return {k: ["B", *v] for k, v in shape_of.items()}

    with torch.no_grad():
        out_shapes = {name: tuple(t.shape[1:]) for name, t in zip(outputs, graph(*example))}
    return {"model": str(path), "kind": kind, "format": fmt, "out": str(out),
            "exporter": "torch.onnx.export(dynamo=True)" if fmt == "onnx" else "torch.jit.trace",
            "opset": opset if fmt == "onnx" else None, "torch_version": torch.__version__,
            "inputs": named(shapes), "outputs": named(out_shapes), "traced_batch": TRACE_BATCH,
            "verification": checked}


def _shape_text(shapes: Mapping[str, list[Any]]) -> str:
    return ", ".join(f"{k} ({', '.join(map(str, v))})" for k, v in shapes.items())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m fct.export",
        description="Export a transformation h or a transformed old model (fct model file) to ONNX or "
                    "TorchScript with a dynamic batch dimension, and verify it against PyTorch.")
    p.add_argument("--model", required=True,
                   help="fct model file of kind 'transformation' or 'transformed_old'")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--image-size", help="H or HxW of a transformed old model's images (default: the file's "
                   "meta.image_size)")
    p.add_argument("--check", action="store_true", help="exit 1 (and write nothing) when the export differs "
                   f"from PyTorch by more than {TOLERANCE:g}")
    args = p.parse_args(argv)
    report = export_model(args.model, args.fmt, args.out, opset=args.opset, image_size=args.image_size,
                          check=args.check)
    how = f"onnx, opset {report['opset']}" if args.fmt == "onnx" else "torchscript"
    print(f"wrote {report['out']} ({how}, {report['exporter']}, torch {report['torch_version']})")
    print(f"inputs: {_shape_text(report['inputs'])}; outputs: {_shape_text(report['outputs'])}; "
          "B is dynamic")
    v = report["verification"]
    runtime = "onnxruntime" if args.fmt == "onnx" else "reloaded TorchScript"
    diffs = ", ".join(f"{k} {d:.3g}" for k, d in v["max_abs_diff"].items())
    print(f"verification: {runtime} vs PyTorch on batches of {', '.join(map(str, v['batch_sizes']))} "
          f"(traced at {report['traced_batch']}): max abs diff {diffs} (tolerance {v['tolerance']:g}): "
          f"{'ok' if v['ok'] else 'FAILED'}")
    if not v["ok"]:
        print("warning: the export differs from PyTorch beyond the tolerance; rerun with --check to "
              "refuse it", file=sys.stderr)
    return report


if __name__ == "__main__":
    from fct.cli import run_main

    sys.exit(run_main(main))
