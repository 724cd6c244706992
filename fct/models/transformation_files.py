"""Writing the model-file kinds of a transformation (:mod:`fct.models.model_file`): h alone
(``transformation``) and the transformed old model (``transformed_old``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch.nn as nn

from fct.config import TransformationArchParams
from fct.errors import ConfigError, UserError
from fct.models.model_file import load_model_file, read_model_file, save_model_file, unwrap_model
from fct.models.scripted import TorchScriptPart, is_torchscript_file
from fct.models.transformed import TransformedOldModel
from fct.transformations.heads import build_transformation

PathLike = Union[str, os.PathLike]


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
