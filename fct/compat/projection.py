"""2-D projections of the same images embedded by two versions, side by side, coloured by class."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence, Union

import numpy as np

from fct.errors import UserError
from fct.io import atomic_savefig

METHODS = ("auto", "umap", "tsne")


def _resolve_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown projection method {method!r}; valid: {', '.join(METHODS)}")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not has_umap:
        raise UserError("projection method 'umap' needs the umap-learn package (pip install umap-learn); "
                        "use method 'tsne' or 'auto'")
    if method == "auto":
        return "umap" if has_umap else "tsne"
    return method


def project_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, d) -> (n, 2) with UMAP or t-SNE (``method`` already resolved)."""
    x = np.asarray(features, dtype=np.float32)
    if method == "umap":
        import umap

        return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(x))
    from sklearn.manifold import TSNE

    # t-SNE needs perplexity < n; 30 (its default) for large n, about n / 3 for small ones
    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)


def plot_projection(features_a: Any, features_b: Any, labels: Any, names: Sequence[str],
                    path: Union[str, os.PathLike], method: str = "auto", max_points: int = 2000,
                    seed: int = 0) -> str:
    """Two panels: the same N images under version ``names[0]`` ((N, d_a) ``features_a``) and
    ``names[1]`` ((N, d_b)), each projected to 2-D on its own, points coloured by ``labels`` (N,).

    At most ``max_points`` images are drawn (a seeded choice, the same images in both panels).
    ``method``: auto (UMAP when umap-learn is installed, else t-SNE with PCA init), umap or tsne.
    Writes ``path`` atomically; returns the method used.
    """
    a, b, y = np.asarray(features_a), np.asarray(features_b), np.asarray(labels)
    if a.ndim != 2 or b.ndim != 2:
        raise UserError(f"features must be 2-d (N, d), got shapes {a.shape} and {b.shape}")
    if not a.shape[0] == b.shape[0] == y.shape[0] or y.ndim != 1:
        raise UserError(f"the two versions must embed the same images: {a.shape[0]} and {b.shape[0]} rows, "
                        f"labels of shape {y.shape}")
    if len(names) != 2:
        raise UserError(f"names must hold the two version names, got {list(names)}")
    if not isinstance(max_points, int) or max_points < 5:
        raise UserError(f"max_points must be an integer >= 5, got {max_points!r}")
    if a.shape[0] < 5:
        raise UserError(f"a projection needs at least 5 images, got {a.shape[0]}")
    used = _resolve_method(method)
    n = a.shape[0]
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        a, b, y = a[keep], b[keep], y[keep]

    from fct.plots import pyplot

    plt = pyplot()
    classes, codes = np.unique(y, return_inverse=True)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "nipy_spectral")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, feats, name in zip(axes, (a, b), names):
        xy = project_2d(feats, used, seed)
        ax.scatter(xy[:, 0], xy[:, 1], c=codes, cmap=cmap, vmin=0, vmax=max(len(classes) - 1, 1), s=8,
                   alpha=0.8, linewidths=0)
        ax.set_title(f"{name} ({feats.shape[1]}-d)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 10:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(k / max(len(classes) - 1, 1)),
                              label=str(c)) for k, c in enumerate(classes)]
        axes[1].legend(handles=handles, title="class", fontsize=8, loc="center left",
                       bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{len(y)} images, {len(classes)} classes, {used.upper()} per version", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return used


__all__ = ["METHODS", "plot_projection", "project_2d"]
