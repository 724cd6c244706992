"""Regression on update: negative flips (flips.py) and backward-compatible weight interpolation
(interpolation.py, sweep.py), protocols.md §7."""

from fct.regression.flips import classification_flips, flip_rates, flip_report, retrieval_flips
from fct.regression.interpolation import (
    average_state_dicts,
    diagonal_fisher,
    interpolate_state_dicts,
    normalize_fisher,
    recompute_bn_stats,
)

__all__ = [
    "average_state_dicts",
    "classification_flips",
    "diagonal_fisher",
    "flip_rates",
    "flip_report",
    "interpolate_state_dicts",
    "normalize_fisher",
    "recompute_bn_stats",
    "retrieval_flips",
]
