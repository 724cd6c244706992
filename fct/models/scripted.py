"""TorchScript models of the FCT reference implementation, answering like fct backbones.

:class:`ScriptedEmbeddingModel` wraps a scripted model loaded from a file;
:class:`TorchScriptPart` is one carried inside a ``transformed_old`` model file as its archive bytes.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from fct.errors import UserError
from fct.models.backbones import BackboneOutput

PathLike = Union[str, os.PathLike]


class ScriptedEmbeddingModel(nn.Module):
    """Wraps a TorchScript embedding model so it answers like a backbone.

    The reference backbones return the pooled feature (N, D, 1, 1), its side-information models
    (N, 128, 1, 1); a scripted model returning a tuple contributes its first tensor. When the
    archive is a reference backbone (``model.fc.weight`` of shape (C, D, 1, 1)), its classifier
    is exposed, frozen, as ``.classifier`` (nn.Linear, no bias) so BCT/FastFill can use it;
    otherwise ``.classifier`` is None. ``logits`` is always None.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, source: str = "") -> None:
        super().__init__()
        self.scripted = scripted
        self.source = source
        self.classifier: Optional[nn.Linear] = None
        self.embedding_dim: Optional[int] = None
        self.num_classes: Optional[int] = None
        fc = dict(scripted.named_parameters()).get("model.fc.weight")
        if fc is not None and fc.dim() == 4 and fc.shape[2:] == (1, 1):
            self.num_classes, self.embedding_dim = int(fc.shape[0]), int(fc.shape[1])
            self.classifier = nn.Linear(self.embedding_dim, self.num_classes, bias=False)
            with torch.no_grad():
                self.classifier.weight.copy_(fc.detach().flatten(1))
            self.classifier.requires_grad_(False)
            self.classifier.to(fc.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D)."""
        out = self.scripted(x)
        if isinstance(out, (tuple, list)):
            tensors = [o for o in out if isinstance(o, torch.Tensor)]
            if not tensors:
                raise UserError(f"{self.source}: the TorchScript model returned no tensor")
            out = tensors[0]
        if not isinstance(out, torch.Tensor):
            raise UserError(f"{self.source}: the TorchScript model returned {type(out).__name__}, not a tensor")
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(N, 3, H, W) -> BackboneOutput(embedding (N, D), logits None)."""
        return BackboneOutput(embedding=self.features(x), logits=None)


def is_torchscript_file(path: PathLike) -> bool:
    """True for an archive written by ``torch.jit.save`` (``<name>/code/`` and ``<name>/constants.pkl``).

    ``torch.save`` also writes a zip, but never a ``code/`` folder nor ``constants.pkl``.
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(re.fullmatch(r"[^/]+/(code/.+|constants\.pkl)", n) for n in names)


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
