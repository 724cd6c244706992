"""Compatibility-matrix metrics over several versions (protocols.md §6).

``M`` is V x V with ``M[i][j]`` the metric (higher is better, e.g. top-1 in %) for queries of
version i against a gallery of version j brought into i's space, for j <= i. Values above the
diagonal are ignored (treated as NaN).

- criterion: version i is compatible with j (i > j) when ``M[i][j] > M[j][j]``;
- AC: the fraction of pairs i > j meeting it; AM: the mean of the lower triangle with the diagonal;
- update gain of (new i, old j): ``(M[i][j] - M[j][j]) / (M*[i][i] - M[j][j])``, M*[i][i] the
  new/new metric of a version-i model trained without any compatibility constraint.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from fct.errors import UserError
from fct.io import atomic_savefig

Reference = Union[Sequence[Optional[float]], Mapping[str, float]]
_FALLBACK_SHORT = "M[i][i] of the matrix itself"
_FALLBACK_NOTE = (f"{_FALLBACK_SHORT} (no unconstrained new/new reference given, so the gain is "
                  "relative to the compatible model's own new/new metric)")


def as_matrix(M: Any) -> np.ndarray:
    """(V, V) float array with the upper triangle set to NaN; the rest must be finite."""
    a = np.array(M, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise UserError(f"a compatibility matrix must be square (V, V), got shape {a.shape}")
    lower = np.tril(np.ones_like(a, dtype=bool))
    if not np.isfinite(a[lower]).all():
        i, j = np.argwhere(lower & ~np.isfinite(a))[0]
        raise UserError(f"compatibility matrix entry [{i}][{j}] (query {i}, gallery {j}) is {a[i, j]}; "
                        "the lower triangle and the diagonal must be finite")
    a[~lower] = np.nan
    return a


def compatibility_criterion(M: Any) -> np.ndarray:
    """(V, V) bool: True where i > j and M[i][j] > M[j][j]; False elsewhere (diagonal, upper triangle)."""
    a = as_matrix(M)
    return np.tril(a > np.diag(a)[None, :], k=-1)


def average_compatibility(M: Any) -> float:
    """AC: fraction of pairs i > j meeting the criterion (NaN for a single version)."""
    a = as_matrix(M)
    pairs = a.shape[0] * (a.shape[0] - 1) // 2
    return float(compatibility_criterion(a).sum() / pairs) if pairs else math.nan


def average_metric(M: Any) -> float:
    """AM: mean of the lower triangle including the diagonal."""
    a = as_matrix(M)
    return float(a[np.tril_indices(a.shape[0])].mean())


def _reference(a: np.ndarray, names: Sequence[str],
               reference_new_new: Optional[Reference]) -> tuple[np.ndarray, list[bool]]:
    """(M*[i][i] per version, whether each came from the given reference)."""
    v = a.shape[0]
    ref = np.diag(a).copy()
    given = [False] * v
    if reference_new_new is None:
        return ref, given
    if isinstance(reference_new_new, Mapping):
        unknown = sorted(set(reference_new_new) - set(names))
        if unknown:
            raise UserError(f"reference_new_new names unknown versions {', '.join(map(str, unknown))}; "
                            f"versions: {', '.join(names)}")
        items = [reference_new_new.get(n) for n in names]
    else:
        items = list(reference_new_new)
        if len(items) != v:
            raise UserError(f"reference_new_new holds {len(items)} values for {v} versions")
    for i, x in enumerate(items):
        if x is not None and not (isinstance(x, float) and math.isnan(x)):
            if not math.isfinite(float(x)):
                raise UserError(f"reference_new_new for version {names[i]} is {x}; give a finite metric "
                                "or null (unknown)")
            ref[i] = float(x)
            given[i] = True
    return ref, given


def update_gain(M: Any, reference_new_new: Optional[Reference] = None,
                names: Optional[Sequence[str]] = None) -> np.ndarray:
    """(V, V): gain of each pair (new i, old j), i > j; NaN elsewhere and where the denominator is 0.

    ``reference_new_new``: M*[i][i] per version (a list of length V, None for unknown, or a
    mapping version name -> value); missing values fall back to M[i][i]."""
    a = as_matrix(M)
    names = [str(i) for i in range(a.shape[0])] if names is None else list(names)
    ref, _ = _reference(a, names, reference_new_new)
    diag = np.diag(a)
    gain = np.full_like(a, np.nan)
    for i in range(a.shape[0]):
        for j in range(i):
            denom = ref[i] - diag[j]
            if denom != 0:
                gain[i, j] = (a[i, j] - diag[j]) / denom
    return gain


def _json_float(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def matrix_summary(M: Any, names: Sequence[str], metric_name: str,
                   reference_new_new: Optional[Reference] = None) -> dict[str, Any]:
    """JSON-ready summary: the matrix (NaN -> None), AC, AM, and per pair i > j the criterion and the
    update gain; ``update_gain_reference`` says where M*[i][i] came from."""
    a = as_matrix(M)
    names = [str(n) for n in names]
    if len(names) != a.shape[0]:
        raise UserError(f"{len(names)} version names for a {a.shape[0]} x {a.shape[0]} matrix")
    ref, given = _reference(a, names, reference_new_new)
    crit = compatibility_criterion(a)
    gain = update_gain(a, reference_new_new, names)
    pairs = []
    for i in range(a.shape[0]):
        for j in range(i):
            pairs.append({"query": names[i], "gallery": names[j], "value": float(a[i, j]),
                          "old_old": float(a[j, j]), "new_new_reference": float(ref[i]),
                          "compatible": bool(crit[i, j]), "update_gain": _json_float(gain[i, j])})
    if all(given[1:]) and a.shape[0] > 1:
        source = "reference_new_new (new models trained without a compatibility constraint)"
    elif not any(given):
        source = _FALLBACK_NOTE
    else:
        missing = [names[i] for i in range(1, a.shape[0]) if not given[i]]
        source = f"reference_new_new where given; {_FALLBACK_SHORT} for {', '.join(missing)}"
    return {
        "metric": metric_name,
        "versions": names,
        "matrix": [[_json_float(x) for x in row] for row in a],
        "AC": _json_float(average_compatibility(a)),
        "AM": _json_float(average_metric(a)),
        "compatible_pairs": int(crit.sum()),
        "pairs": len(pairs),
        "pair_details": pairs,
        "update_gain_reference": source,
    }


def plot_matrix(M: Any, names: Sequence[str], path: Union[str, os.PathLike], title: str = "") -> None:
    """Heat map of the lower triangle (upper blank), values written in the cells; cells i > j that
    fail the criterion M[i][j] > M[j][j] get a red border. PNG (or the format of ``path``), atomic."""
    from fct.plots import pyplot

    a = as_matrix(M)
    names = [str(n) for n in names]
    if len(names) != a.shape[0]:
        raise UserError(f"{len(names)} version names for a {a.shape[0]} x {a.shape[0]} matrix")
    plt = pyplot()
    from matplotlib.patches import Rectangle

    v = a.shape[0]
    crit = compatibility_criterion(a)
    side = 1.2 + 0.9 * v
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    lo, hi = np.nanmin(a), np.nanmax(a)
    mid = (lo + hi) / 2
    for i in range(v):
        for j in range(i + 1):
            ax.text(j, i, f"{a[i, j]:.1f}", ha="center", va="center", fontsize=9,
                    color="black" if a[i, j] > mid else "white")
            if i > j and not crit[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(v), names, rotation=45, ha="right")
    ax.set_yticks(range(v), names)
    ax.set_xlabel("gallery version")
    ax.set_ylabel("query version")
    ac, am = average_compatibility(a), average_metric(a)
    stats = f"AC {ac:.2f}  AM {am:.2f}" if v > 1 else f"AM {am:.2f}"
    legend = f"{stats}; red: M[i][j] <= M[j][j]"
    ax.set_title(f"{title}\n{legend}" if title else legend, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


__all__ = [
    "as_matrix",
    "average_compatibility",
    "average_metric",
    "compatibility_criterion",
    "matrix_summary",
    "plot_matrix",
    "update_gain",
]
