"""The transformed old model x -> h(phi_old(x), phi_side(x)), and the model-file kinds of h.

Two kinds are registered in :data:`fct.models.MODEL_KINDS`:

``transformation``
    h alone; ``arch_params`` are the transformation arch params (``build_transformation``).
``transformed_old``
    old model + optional side-information model + h, in one file, usable wherever an image
    model is (e.g. the gallery model of ``eval.py``). ``arch_params``::

        {'transformation': {h arch params},
         'old_model': PART, 'side_model': PART or None}

    where PART is ``{'kind': ..., 'arch_params': {...}}`` for an fct model file (its weights are
    in the file's state dict under ``old_model.`` / ``side_model.``), or
    ``{'torchscript': uint8 tensor, 'source': str}`` for a TorchScript model (the reference's
    format): the bytes of its archive, which hold its weights. A TorchScript part therefore adds
    nothing to the state dict (its weights are stored once, in the archive), and the file still
    loads with ``weights_only=True``. Parts nest: an old model that is itself ``transformed_old``
    (a chain of updates) is stored as such.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from fct.errors import ConfigError, UserError
from fct.models.backbones import BackboneOutput
from fct.models.model_file import (
    MODEL_KINDS,
    ScriptedEmbeddingModel,
    is_torchscript_file,
    load_model_file,
    read_model_file,
    save_model_file,
    unwrap_model,
)
from fct.config import TransformationArchParams
from fct.transformations.heads import Transformation, TransformationOutput, build_transformation

PathLike = Union[str, os.PathLike]
_TRANSFORMED_KEYS = ("transformation", "old_model", "side_model")


def _embedding(out: Any, what: str) -> torch.Tensor:
    """(N, D) from a BackboneOutput-like result or a plain (N, D[, 1, 1]) tensor."""
    emb = getattr(out, "embedding", out)
    if not isinstance(emb, torch.Tensor):
        raise UserError(f"the {what} returned {type(out).__name__}, not an embedding tensor")
    return emb.flatten(1)


class TorchScriptPart(nn.Module):
    """A TorchScript sub-model whose weights travel in its archive bytes, not in the state dict.

    The scripted model is deliberately *not* a registered submodule: registering it would put its
    weights in the parent's state dict, storing them twice in a model file (once in the archive,
    which TorchScript needs for its code, once in the state dict). Device/dtype moves and
    train/eval switches are forwarded to it by hand; it is frozen and absent from
    ``parameters()``.
    """

    def __init__(self, archive: bytes, source: str = "") -> None:
        super().__init__()
        self.archive = archive
        self.source = source
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream, but it is the reference's exchange format.
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
                scripted = torch.jit.load(io.BytesIO(archive), map_location="cpu")
        except Exception as e:  # a corrupt archive surfaces as several error types
            detail = " ".join(str(e).split())[:120]
            raise UserError(f"{source or 'embedded TorchScript model'}: cannot load TorchScript archive "
                            f"({type(e).__name__}: {detail})") from None
        inner = ScriptedEmbeddingModel(scripted, source=source).eval().requires_grad_(False)
        object.__setattr__(self, "inner", inner)  # bypasses nn.Module registration (see class docstring)

    def _apply(self, fn: Any, recurse: bool = True) -> "TorchScriptPart":
        if recurse:
            self.inner._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "TorchScriptPart":
        self.inner.train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(N, 3, H, W) -> BackboneOutput(embedding (N, D), logits None)."""
        return self.inner(x)

    def spec(self) -> dict[str, Any]:
        """The PART entry of a ``transformed_old`` file (see the module docstring)."""
        return {"torchscript": torch.frombuffer(bytearray(self.archive), dtype=torch.uint8), "source": self.source}


class TransformedOldModel(nn.Module):
    """x -> h(old(x), side(x)): old-model features brought into the new model's space.

    ``side_model=None``: h's side branch takes the old feature (no side-information model).
    The forward answers like a backbone (BackboneOutput, ``logits`` None), so feature extraction
    and evaluation take it as any gallery model.
    """

    def __init__(self, old_model: nn.Module, side_model: Optional[nn.Module], transformation: Transformation) -> None:
        super().__init__()
        self.old_model = old_model
        self.side_model = side_model
        self.transformation = transformation
        self.classifier = None  # it embeds only; no classifier of its own
        self.embedding_dim = transformation.new_embedding_dim

    def transform(self, x: torch.Tensor) -> TransformationOutput:
        """(N, 3, H, W) -> h's output: feature (N, new_dim), log_variance (N, sigma_dim) or None."""
        old = _embedding(self.old_model(x), "old model")
        side = None if self.side_model is None else _embedding(self.side_model(x), "side-information model")
        return self.transformation(old, side)

    def embed_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(N, 3, H, W) -> (feature (N, new_dim), log_variance (N, sigma_dim) or None)."""
        out = self.transform(x)
        return out.feature, out.log_variance

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(N, 3, H, W) -> BackboneOutput(embedding h(old, side) (N, new_dim), logits None)."""
        return BackboneOutput(embedding=self.transform(x).feature, logits=None)


# --------------------------------------------------------------------------------------------
# Model-file kinds
# --------------------------------------------------------------------------------------------


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


def _h_arch_params(h: nn.Module, given: Union[TransformationArchParams, Mapping[str, Any]]) -> dict[str, Any]:
    """h's own arch params, after checking that the given ones describe the same network."""
    if not isinstance(given, TransformationArchParams):
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(TransformationArchParams)})
        if unknown:
            raise ConfigError(f"unknown transformation arch_params key(s) {', '.join(unknown)}")
        given = TransformationArchParams(**given)
    own = unwrap_model(h).arch_params()
    if given.to_dict() != own:
        raise UserError(f"the transformation's arch params {own} differ from the ones given to save it "
                        f"{given.to_dict()}")
    return own


def save_transformation(path: PathLike, h: nn.Module,
                        arch_params: Union[TransformationArchParams, Mapping[str, Any]],
                        meta: Optional[dict] = None) -> None:
    """Write h alone as an fct-model file of kind ``transformation`` (atomic; rank 0 only)."""
    save_model_file(path, h, kind="transformation", arch_params=_h_arch_params(h, arch_params), meta=meta)


def _part_dim(part: nn.Module) -> Optional[int]:
    """The embedding width a part declares (None when it does not say, e.g. some TorchScript models)."""
    inner = getattr(part, "inner", part)
    dim = getattr(inner, "embedding_dim", None)
    return dim if isinstance(dim, int) else None


def _load_part(path: PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The module in ``path`` and its PART entry."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if is_torchscript_file(path):
        part = TorchScriptPart(path.read_bytes(), source=str(path))
        return part, part.spec()
    data = read_model_file(path)
    if data["kind"] == "transformation":
        raise UserError(f"{path} holds a transformation alone (it maps features), not a model of images")
    return load_model_file(path), {"kind": data["kind"], "arch_params": data["arch_params"]}


def save_transformed_old_model(path: PathLike, old_path: PathLike, side_path: Optional[PathLike],
                               h: nn.Module, h_arch_params: Union[TransformationArchParams, Mapping[str, Any]],
                               meta: Optional[dict] = None) -> TransformedOldModel:
    """Write old model (``old_path``) + side-information model (``side_path`` or None) + h as one
    ``transformed_old`` file (atomic; rank 0 only). Each sub-model file is an fct model file or a
    TorchScript file. Returns the saved model (CPU, eval mode)."""
    own = _h_arch_params(h, h_arch_params)
    old, old_spec = _load_part(old_path)
    side, side_spec = (None, None) if side_path is None else _load_part(side_path)
    for part, part_path, key in ((old, old_path, "old_embedding_dim"), (side, side_path, "side_info_dim")):
        dim = None if part is None else _part_dim(part)
        want = own["old_embedding_dim"] if key == "old_embedding_dim" else own["side_info_dim"]
        if dim is not None and want is not None and dim != want:
            raise UserError(f"{part_path} gives {dim}-d embeddings but the transformation's {key} is {want}")
    h_cpu = build_transformation(**own)
    h_cpu.load_state_dict({k: v.detach().cpu() for k, v in unwrap_model(h).state_dict().items()})
    model = TransformedOldModel(old, side, h_cpu).eval()
    meta = {"old_model_path": str(old_path), "side_info_model_path": None if side_path is None else str(side_path),
            **(meta or {})}
    arch_params = {"transformation": own, "old_model": old_spec, "side_model": side_spec}
    save_model_file(path, model, kind="transformed_old", arch_params=arch_params, meta=meta)
    return model
