"""Compatibility across many versions (protocols.md §5-§6): a registry of embedding versions and
the maps between them (versions.py), a resumable converter of stored embeddings (convert.py),
compatibility-matrix metrics (matrix.py) and 2-D projections (projection.py)."""

from __future__ import annotations

from typing import Any

from fct.compat.matrix import (
    average_compatibility,
    average_metric,
    compatibility_criterion,
    matrix_summary,
    plot_matrix,
    update_gain,
)
from fct.compat.projection import plot_projection
from fct.compat.versions import (
    CHANGES,
    EDGE_KINDS,
    Edge,
    VersionManifest,
    VersionRegistry,
    compose_maps,
    edges_fingerprint,
    load_map,
)


def __getattr__(name: str) -> Any:
    # convert.py is also run as ``python -m fct.compat.convert``; importing it here eagerly would
    # make runpy warn that the module was imported before being executed.
    if name in ("convert_embeddings", "open_features"):
        from fct.compat import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'fct.compat' has no attribute {name!r}")


__all__ = [
    "CHANGES",
    "EDGE_KINDS",
    "Edge",
    "VersionManifest",
    "VersionRegistry",
    "average_compatibility",
    "average_metric",
    "compatibility_criterion",
    "compose_maps",
    "convert_embeddings",
    "edges_fingerprint",
    "load_map",
    "matrix_summary",
    "open_features",
    "plot_matrix",
    "plot_projection",
    "update_gain",
]
