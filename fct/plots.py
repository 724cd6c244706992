"""Plots a reader would rather look at than read (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from fct.io import atomic_savefig

if TYPE_CHECKING:
    from fct.retrieval.backfilling import BackfillCurve


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display needed), imported only when
    a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_backfilling(curves: dict[str, "BackfillCurve"], path: str | os.PathLike, title: str = "") -> None:
    """One panel per metric (top-k, mAP), x = backfilled fraction of the gallery in percent, one
    line per ordering with its AUC (mean of the points) in the legend; several runs (random)
    show their mean with a min-max band."""
    plt = pyplot()
    metrics = list(next(iter(curves.values())).values)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for name, c in curves.items():
            x = [100.0 * f for f in c.fractions]
            v = c.values[m]
            label = f"{name} (AUC {c.auc(m).mean():.2f})"
            ax.plot(x, v.mean(axis=0), marker="o", markersize=3, label=label)
            if v.shape[0] > 1:
                ax.fill_between(x, v.min(axis=0), v.max(axis=0), alpha=0.2)
        ax.set_xlabel("gallery backfilled (%)")
        ax.set_ylabel(f"{m} (%)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
