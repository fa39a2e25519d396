"""Small shared builders for tests (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np

from recon.dataset_io import Dataset


def tiny_pool(per_class: int = 12, classes: int = 10, seed: int = 0, size: int = 32) -> Dataset:
    """Seeded class-conditional blobs: each class has its own mean colour, so a CNN can learn it fast."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    means = rng.random((classes, 3, 1, 1))
    imgs = means[labels] + 0.15 * rng.standard_normal((len(labels), 3, size, size))
    return Dataset(np.clip(imgs, 0, 1).astype(np.float32), labels.astype(np.int64))
