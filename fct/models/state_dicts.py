"""Comparing a weight file's state dict with a model's, for one readable error line."""

from __future__ import annotations

from typing import Mapping, Optional

import torch


def first_names(items: list[str], n: int = 3) -> str:
    """The first ``n`` names, and how many more there are."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None when ``state`` has exactly ``expected``'s keys and shapes, else the first missing and
    unexpected keys and shape mismatches, e.g. ``missing keys: a, b; shape mismatch: c (file (2,),
    model (3,))``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"missing keys: {first_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {first_names(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {first_names(shapes, 2)}")
    return "; ".join(parts) or None
