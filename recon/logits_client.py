"""The interface refine stages use to get logits, whatever answers them.

The in-process replica client answers from the replica's classifier; the HTTP client (same interface)
talks to the replica server or the real competition.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

MAX_BATCH = 100


class LogitsClient(Protocol):
    n_queries: int  # real (paid) calls
    n_images: int

    def logits(self, images: np.ndarray) -> np.ndarray: ...


class ReplicaLogits:
    """Logits from a local replica's classifier, counted as if each batch of 100 were one API call."""

    def __init__(self, replica):
        self.replica = replica
        self.n_queries = 0
        self.n_images = 0
        self.n_cached = 0

    def logits(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        out = []
        for start in range(0, len(images), MAX_BATCH):
            batch = images[start : start + MAX_BATCH]
            out.append(self.replica.logits(batch))
            self.n_queries += 1
            self.n_images += len(batch)
        return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
