"""PNG figures for runs and sweeps (matplotlib, headless)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike, num_classes: int = 10,
               max_cols: int = 20) -> None:
    """Each class on its own row(s), in submission order; a class-free solver can give one class most of the
    images, so a class wraps onto further rows after `max_cols` instead of making the figure metres wide."""
    counts = np.bincount(labels, minlength=num_classes)
    cols = int(min(max(counts.max(), 1), max_cols))
    rows_of = np.maximum(1, -(-counts // cols))  # ceil, and an empty class keeps its (blank) row
    fig, axes = plt.subplots(int(rows_of.sum()), cols, figsize=(cols * 0.8, rows_of.sum() * 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    first_row = np.concatenate([[0], np.cumsum(rows_of)[:-1]])
    for c in range(num_classes):
        for j, img in enumerate(images[labels == c]):
            axes[first_row[c] + j // cols, j % cols].imshow(np.clip(img.transpose(1, 2, 0), 0, 1),
                                                             interpolation="nearest")
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0, right=1, top=1, bottom=0)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def heatmap(values: np.ndarray, rows: list, cols: list, row_name: str, col_name: str, title: str,
            path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.8 * len(rows) + 1.5))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.4g}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
