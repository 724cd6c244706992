"""Per-run logs: one JSON line per epoch in ``metrics.jsonl`` and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from fct import dist
from fct.io import atomic_write_text


class RunLog:
    """Writes ``run_dir/metrics.jsonl`` and ``run_dir/tb``; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool, resume_epoch: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.active = dist.is_main()
        self.writer: Optional[Any] = None
        if not self.active:
            return
        # On resume, drop lines of epochs that will be run again (they belonged to work after
        # the last checkpoint), so the log holds each epoch once.
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("epoch", 0) < resume_epoch:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            atomic_write_text("".join(k + "\n" for k in kept), self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_epoch)

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            step = int(record["epoch"])
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k.replace(".", "/"), v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
