"""PNG figures for runs and sweeps (matplotlib, headless)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike, num_classes: int = 10) -> None:
    """One row per class, in submission order within the row."""
    per = int(np.bincount(labels, minlength=num_classes).max())
    fig, axes = plt.subplots(num_classes, per, figsize=(per * 0.8, num_classes * 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for c in range(num_classes):
        for j, img in enumerate(images[labels == c]):
            axes[c, j].imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest")
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
