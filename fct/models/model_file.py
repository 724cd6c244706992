"""Self-describing model files, loaded without unpickling code.

A model file is one ``torch.save``'d dict holding only plain types and tensors::

    {'format': 'fct-model', 'format_version': 1, 'kind': 'backbone',
     'arch_params': {...}, 'state_dict': {...}, 'meta': {...}}

``kind`` names a builder in :data:`MODEL_KINDS` that turns ``arch_params`` into an empty module;
the state dict is then loaded into it. Since the file never stores a class, it loads with
``torch.load(weights_only=True)``. TorchScript files of the FCT reference implementation are
accepted wherever a model path is: they are wrapped in :class:`ScriptedEmbeddingModel`.

The kinds, all registered here so that every file loads whatever was imported before:

``backbone``
    ``arch_params`` are those of ``build_backbone``.
``transformation``
    h alone; ``arch_params`` are the transformation arch params (``build_transformation``).
``transformed_old``
    old model + optional side-information model + h, in one file (:class:`TransformedOldModel`).
    ``arch_params``::

        {'transformation': {h arch params},
         'old_model': PART, 'side_model': PART or None}

    where PART is ``{'kind': ..., 'arch_params': {...}}`` for an fct model file (its weights are
    in the file's state dict under ``old_model.`` / ``side_model.``), or
    ``{'torchscript': uint8 tensor, 'source': str}`` for a TorchScript model (the reference's
    format): the bytes of its archive, which hold its weights. A TorchScript part therefore adds
    nothing to the state dict (its weights are stored once, in the archive), and the file still
    loads with ``weights_only=True``. Parts nest: an old model that is itself ``transformed_old``
    (a chain of updates) is stored as such. ``fct.models.transformation_files`` writes these two.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from fct.errors import ConfigError, UserError
from fct.io import atomic_torch_save
from fct.models.backbones import BackboneOutput, build_backbone
from fct.models.scripted import ScriptedEmbeddingModel, TorchScriptPart, is_torchscript_file
from fct.models.state_dicts import state_dict_mismatch
from fct.models.transformed import TransformedOldModel
from fct.registry import Registry
from fct.transformations.heads import build_transformation

FORMAT = "fct-model"
FORMAT_VERSION = 1
_HEADER_KEYS = ("format", "format_version", "kind", "arch_params", "state_dict", "meta")
# Wrappers whose state dicts prefix every key: DDP ('module.') and torch.compile ('_orig_mod.').
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device]

ModelBuilder = Callable[[dict], nn.Module]

MODEL_KINDS: Registry[ModelBuilder] = Registry("model kind")

_BACKBONE_PARAMS = ("arch", "num_classes", "embedding_dim", "last_nonlin", "pretrained_path", "key_map",
                    "embedding_layer", "arch_kwargs", "image_mean", "image_std", "image_size")
_TRANSFORMED_KEYS = ("transformation", "old_model", "side_model")


@MODEL_KINDS.register("backbone")
def _build_backbone_kind(arch_params: dict) -> nn.Module:
    unknown = sorted(set(arch_params) - set(_BACKBONE_PARAMS))
    if unknown:
        raise ConfigError(f"unknown arch_params key(s) {', '.join(unknown)}; valid: {', '.join(_BACKBONE_PARAMS)}")
    for key in ("arch", "num_classes"):
        if key not in arch_params:
            raise ConfigError(f"arch_params.{key} is missing")
    # pretrained_path is a record of where training started; the file's state dict holds the weights.
    return build_backbone(**arch_params, load_weights=False)


@MODEL_KINDS.register("transformation")
def _build_transformation_kind(arch_params: dict) -> nn.Module:
    if "arch" not in arch_params:
        raise ConfigError("arch_params.arch is missing")
    return build_transformation(**arch_params)


def _build_part(spec: Any, key: str) -> nn.Module:
    """Empty module of one PART entry (TorchScript parts come with their weights)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"arch_params.{key} must be a mapping, got {type(spec).__name__}")
    if "torchscript" in spec:
        data = spec["torchscript"]
        if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1):
            raise ConfigError(f"arch_params.{key}.torchscript must be a 1-d uint8 tensor")
        return TorchScriptPart(data.numpy().tobytes(), source=str(spec.get("source", "")))
    if set(spec) != {"kind", "arch_params"}:
        raise ConfigError(f"arch_params.{key} must hold 'kind' and 'arch_params' (or 'torchscript'), "
                          f"got keys {', '.join(sorted(map(str, spec))) or '(none)'}")
    return MODEL_KINDS.get(spec["kind"])(spec["arch_params"])


@MODEL_KINDS.register("transformed_old")
def _build_transformed_old_kind(arch_params: dict) -> nn.Module:
    missing = [k for k in _TRANSFORMED_KEYS if k not in arch_params]
    unknown = sorted(set(arch_params) - set(_TRANSFORMED_KEYS))
    if missing or unknown:
        raise ConfigError(f"transformed_old arch_params: missing keys {missing or 'none'}, unknown keys "
                          f"{unknown or 'none'}; valid: {', '.join(_TRANSFORMED_KEYS)}")
    h_params = arch_params["transformation"]
    if not isinstance(h_params, Mapping) or "arch" not in h_params:
        raise ConfigError("arch_params.transformation must be a mapping with 'arch'")
    h = build_transformation(**h_params)
    side_spec = arch_params["side_model"]
    side = None if side_spec is None else _build_part(side_spec, "side_model")
    return TransformedOldModel(_build_part(arch_params["old_model"], "old_model"), side, h)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove leading 'module.' / '_orig_mod.' (in any nesting) from every key."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is made of types that ``weights_only`` loading accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            _check_plain(item, f"{where}.{k}")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; model files hold only dicts, lists, "
                    "str, int, float, bool, None and tensors")


def save_model_file(path: PathLike, model: nn.Module, *, kind: str, arch_params: dict,
                    meta: Optional[dict] = None) -> None:
    """Write ``model`` atomically as an fct-model file (rank 0 should call this, not every rank).

    Tensors are stored detached on the CPU; DDP / torch.compile prefixes are stripped.
    """
    MODEL_KINDS.get(kind)  # an unknown kind fails now, not when someone loads the file
    meta = {} if meta is None else meta
    _check_plain(arch_params, "arch_params")
    _check_plain(meta, "meta")
    state = strip_wrapper_prefixes(unwrap_model(model).state_dict())
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    _check_plain(state, "state_dict")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "arch_params": dict(arch_params),
        "state_dict": state,
        "meta": dict(meta),
    }
    atomic_torch_save(payload, path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """A few words on what a file that is not a PyTorch file seems to be."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return "unreadable"
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile):
            names = []
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive"
        return "a zip archive that torch.load cannot read"
    if head[:1] == b"\x80":
        return "a Python pickle"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unknown binary file"


def _describe(value: Any) -> str:
    """What a loaded object that lacks our header looks like."""
    if isinstance(value, Mapping):
        keys = list(value.keys())
        if "format" in value and value["format"] != FORMAT:
            return f"a {value['format']!r} file"
        if keys and all(isinstance(v, torch.Tensor) for v in value.values()):
            return f"a plain state_dict ({len(keys)} tensors, e.g. {keys[0]!r}) without the 'fct-model' header"
        shown = ", ".join(map(str, keys[:6])) + (", ..." if len(keys) > 6 else "")
        if {"optimizer", "epoch"} & set(map(str, keys)):
            return f"a training checkpoint (keys: {shown})"
        return f"a dict with keys {shown or '(none)'}"
    if isinstance(value, torch.Tensor):
        return f"a single tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def read_model_file(path: PathLike) -> dict:
    """Load and validate an fct-model file; returns its raw dict (tensors on the CPU)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if path.is_dir():
        raise UserError(f"model file {path} is a directory, not a file")
    if is_torchscript_file(path):
        raise UserError(f"{path} is a TorchScript archive, not an fct-model file; load it with load_model_file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg:
            found = re.search(r"GLOBAL (\S+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise UserError(f"{path} is not a safe model file: loading it would unpickle code{what}; "
                            "fct loads model files with weights_only=True only") from None
        raise UserError(f"{path} is not a model file: it is {_sniff(path)}, not a PyTorch file") from None
    except Exception:  # noqa: BLE001 - arbitrary bytes fail inside the unpickler in many ways
        raise UserError(f"{path} is not a model file: it is {_sniff(path)}, not a PyTorch file") from None

    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        raise UserError(f"{path} is not an fct model file: it is {_describe(data)}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: fct-model format_version {version!r} is not supported (this code reads "
                        f"version {FORMAT_VERSION})")
    missing = [k for k in _HEADER_KEYS if k not in data]
    extra = sorted(set(data) - set(_HEADER_KEYS))
    if missing or extra:
        raise UserError(f"{path}: malformed fct-model file (missing keys: {missing or 'none'}, "
                        f"unexpected keys: {extra or 'none'})")
    for key, typ in (("kind", str), ("arch_params", dict), ("state_dict", dict), ("meta", dict)):
        if not isinstance(data[key], typ):
            raise UserError(f"{path}: malformed fct-model file ({key!r} is a {type(data[key]).__name__})")
    bad = [k for k, v in data["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: malformed fct-model file (state_dict entry {bad[0]!r} is not a tensor)")
    return data


def _load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error naming the first offending keys."""
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise UserError(f"{path}: state_dict does not match {what}: {mismatch}")
    model.load_state_dict(state, strict=True)


def _error_line(e: BaseException) -> str:
    """The line of an exception's message that says what went wrong: the first, except for
    TorchScript errors, whose message opens with a code traceback and ends with the error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = lines[-1] if lines[0].startswith("The following operation failed in the TorchScript") else lines[0]
    line = line if re.match(r"\w+(Error|Exception): ", line) else f"{type(e).__name__}: {line}"
    return line if len(line) <= 300 else line[:297] + "..."


def probe_model(model: nn.Module, example_input: torch.Tensor, path: PathLike) -> None:
    """Run ``model`` once on a batch of 2 images shaped like the data's, so that a model file
    that does not take them fails now, in one line naming the file, instead of deep in a run.

    example_input: one image (C, H, W) or a batch (N, C, H, W) of the data (only its first image
    is used, twice). Eval mode, no grad, on the model's device. UserError when the call fails or
    does not return one embedding per image.
    """
    first = example_input if example_input.dim() == 3 else example_input[0]
    if first.dim() != 3:
        raise ValueError(f"example_input must be (C, H, W) or (N, C, H, W), got {tuple(example_input.shape)}")
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    x = first.detach().to(device=device, dtype=torch.float32).unsqueeze(0).repeat(2, 1, 1, 1)
    shape = tuple(x.shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except UserError:
        raise  # already one line naming the file (e.g. a scripted model that returns no tensor)
    except Exception as e:  # noqa: BLE001 - a foreign model fails in any way
        raise UserError(f"{path} does not take the data's images: on a batch of shape {shape} it fails "
                        f"with {_error_line(e)}") from None
    finally:
        model.train(was_training)
    emb = out.embedding if isinstance(out, BackboneOutput) else out
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != shape[0]:
        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise UserError(f"{path}: on a batch of shape {shape} the model returns embeddings of shape {got}, "
                        f"expected ({shape[0]}, D)")


def load_model_file(path: PathLike, map_location: Device = "cpu",
                    example_input: Optional[torch.Tensor] = None,
                    input_stats: Optional[tuple[Sequence[float], Sequence[float]]] = None) -> nn.Module:
    """Build the model an fct-model file describes (or wrap a TorchScript file); eval mode, on map_location.

    example_input: an image (C, H, W) or batch of the data the model will see. A TorchScript file
    (built outside fct, so nothing says what it takes) is then probed once with it
    (:func:`probe_model`); fct's own model files are self-describing and are not probed.
    input_stats: (mean, std) the images fed to the model are normalised with (the data set's);
    every timm / torchvision backbone in the file converts them to its own (see
    :func:`fct.models.foreign.expect_inputs`); fct's own backbones are trained on them as they are.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if is_torchscript_file(path):
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream, but it is the reference's exchange format.
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
                scripted = torch.jit.load(str(path), map_location=map_location)
        except Exception as e:  # a corrupt archive surfaces as several error types
            detail = " ".join(str(e).split())[:120]
            raise UserError(f"{path}: cannot load TorchScript archive ({type(e).__name__}: {detail})") from None
        wrapped = ScriptedEmbeddingModel(scripted, source=str(path)).eval()
        if example_input is not None:
            probe_model(wrapped, example_input, path)
        return wrapped

    data = read_model_file(path)
    kind, arch_params = data["kind"], data["arch_params"]
    try:
        builder = MODEL_KINDS.get(kind)
        model = builder(arch_params)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except TypeError as e:
        raise UserError(f"{path}: arch_params {arch_params} do not fit kind {kind!r} ({e})") from None
    what = f"kind {kind!r}" + (f" arch {arch_params['arch']!r}" if "arch" in arch_params else "")
    _load_state_checked(model, strip_wrapper_prefixes(data["state_dict"]), path, what)
    if input_stats is not None:
        from fct.models.foreign import expect_inputs

        expect_inputs(model, *input_stats)
    return model.to(map_location).eval()


def model_num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
