"""Self-describing, atomic, resumable training checkpoints (rank 0 writes, all ranks read)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

import fct
from fct import dist
from fct.errors import UserError
from fct.io import atomic_torch_save, atomic_write_text
from fct.models import unwrap_model

FORMAT = "fct-checkpoint"
# Config keys whose change does not make an existing checkpoint a different run.
RESUMABLE_CHANGES = ("runtime", "output_dir", "dataset_params.num_workers")


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
                "model": unwrap_model(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "config": config,
                "code_version": fct.__version__,
                "extra": extra or {},
            }
            atomic_torch_save(state, self.path)
        dist.barrier()

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: Optional[torch.amp.GradScaler], config: dict, epochs: int) -> tuple[int, dict]:
        """Restore the run's state if a checkpoint exists; return (epochs done, last metrics).

        A checkpoint written by a different config (other than RESUMABLE_CHANGES) is refused."""
        state = self.load()
        if state is None:
            return 0, {}
        diff = _config_difference(state["config"], config)
        if diff:
            raise UserError(
                f"{self.path} was written by a different config ({diff} changed); "
                "set output_dir to a new folder, or delete the old run to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        if dist.is_main():
            print(f"resuming {self.path.parent} after epoch {start}/{epochs}")
        return start, dict(state.get("extra", {}).get("last", {}))

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


def _config_difference(old: dict, new: dict) -> Optional[str]:
    old, new = dict(old), dict(new)
    for key in RESUMABLE_CHANGES:
        head, _, tail = key.partition(".")
        for d in (old, new):
            if tail and isinstance(d.get(head), dict):
                d[head] = {k: v for k, v in d[head].items() if k != tail}
            elif not tail:
                d.pop(head, None)
    return first_difference(old, new)


def write_resolved_config(run_dir: str | os.PathLike, config: dict) -> None:
    """``run_dir/config.yaml``: the config as resolved (defaults and overrides applied)."""
    if dist.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(config, sort_keys=False), Path(run_dir) / "config.yaml")


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
