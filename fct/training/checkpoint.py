"""Self-describing, atomic, resumable training checkpoints (rank 0 writes, all ranks read)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

import fct
from fct import dist
from fct.errors import RunError, UserError
from fct.io import atomic_torch_save, atomic_write_text
from fct.models import unwrap_model

FORMAT = "fct-checkpoint"
# Config keys whose change does not make an existing checkpoint a different run.
RESUMABLE_CHANGES = ("runtime", "output_dir", "dataset_params.num_workers")


class Checkpointer:
    """``run_dir/checkpoint.pt`` holding model, optimizer, scaler, next epoch, config, version."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "checkpoint.pt"
        self._state: Optional[dict[str, Any]] = None
        self._loaded = False

    def save(self, *, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: Optional[torch.amp.GradScaler], config: dict, extra: Optional[dict] = None) -> None:
        """Save the state after ``epoch`` epochs are complete (rank 0 only).

        A model holding a non-finite parameter or buffer (e.g. an ``inf`` BatchNorm running
        variance after a loss spike) is not saved: RunError on every rank, the last good
        checkpoint kept."""
        check_finite_state(unwrap_model(model), epoch)
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
        self.check_config(config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        if dist.is_main():
            print(f"resuming {self.path.parent} after epoch {start}/{epochs}")
        return start, dict(state.get("extra", {}).get("last", {}))

    def check_config(self, config: dict) -> None:
        """Refuse to continue a checkpoint written by a different config, naming every changed key
        (changes listed in RESUMABLE_CHANGES are allowed)."""
        state = self.load()
        if state is None:
            return
        diff = config_differences(state["config"], config)
        if diff:
            raise UserError(
                f"{self.path} was written by a different config ({', '.join(diff)} changed); "
                "set output_dir to a new folder, or delete the old run to start over"
            )

    def load(self) -> Optional[dict[str, Any]]:
        """The checkpoint's contents, or None when there is none; read from disk once per run."""
        if not self._loaded:
            self._state = self._read()
            self._loaded = True
        return self._state

    def _read(self) -> Optional[dict[str, Any]]:
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


def check_finite_state(model: torch.nn.Module, epoch: int) -> None:
    """RunError (on every rank) when a parameter or buffer of ``model`` is not finite."""
    state = {k: t for k, t in model.state_dict().items() if t.is_floating_point()}
    device = next(iter(state.values())).device
    # one flag per tensor computed on the device, then a single host sync (not one per tensor)
    finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).cpu()
    bad = next((name for name, ok in zip(state, finite.tolist()) if not ok), None)
    flag = dist.all_reduce_sum(torch.tensor([0.0 if bad is None else 1.0], device=device))
    if flag.item() > 0:
        where = f"{bad} holds" if bad is not None else "another process's model holds"
        raise RunError(
            f"after epoch {epoch}, {where} a non-finite value (inf or nan); the checkpoint was not "
            "written and the last good one is kept. Lower optimizer_params.lr, use precision fp32, "
            "or check the data"
        )


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted paths of every config value that differs, except RESUMABLE_CHANGES."""
    old, new = dict(old), dict(new)
    for key in RESUMABLE_CHANGES:
        head, _, tail = key.partition(".")
        for d in (old, new):
            if tail and isinstance(d.get(head), dict):
                d[head] = {k: v for k, v in d[head].items() if k != tail}
            elif not tail:
                d.pop(head, None)
    return all_differences(old, new)


def write_resolved_config(run_dir: str | os.PathLike, config: dict) -> None:
    """``run_dir/config.yaml``: the config as resolved (defaults and overrides applied)."""
    if dist.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(config, sort_keys=False), Path(run_dir) / "config.yaml")


def all_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every differing value between two nested mappings, in sorted key order."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += all_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [prefix or "<root>"]


def first_difference(a: Any, b: Any) -> Optional[str]:
    """Dotted path of the first differing value between two nested mappings, or None."""
    diff = all_differences(a, b)
    return diff[0] if diff else None
