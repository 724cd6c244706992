"""Self-describing, atomic, resumable training checkpoints (rank 0 writes, all ranks read)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

import fct
from fct import dist
from fct.errors import UserError
from fct.io import atomic_torch_save

FORMAT = "fct-checkpoint"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module  # DDP
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        else:
            return model


class Checkpointer:
    """``run_dir/checkpoint.pt`` holding model, optimizer, scaler, next epoch, config, version."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "checkpoint.pt"

    def save(self, *, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: Optional[torch.amp.GradScaler], config: dict, extra: Optional[dict] = None) -> None:
        """Save the state after ``epoch`` epochs are complete (rank 0 only)."""
        if dist.is_main():
            state = {
                "format": FORMAT,
                "epoch": epoch,
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "config": config,
                "code_version": fct.__version__,
                "extra": extra or {},
            }
            atomic_torch_save(state, self.path)
        dist.barrier()

    def load(self) -> Optional[dict[str, Any]]:
        """The checkpoint's contents, or None when there is none."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise UserError(
                f"{self.path}: cannot read the checkpoint ({type(e).__name__}); delete it to start over"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{self.path}: not an fct checkpoint; delete it or choose another output_dir")
        return state


def first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    """Dotted path of the first differing value between two nested mappings, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return None if a == b else (prefix or "<root>")
