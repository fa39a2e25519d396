"""Refine stages that spend logits: `logits_swap` (recipe final) and `light_optimize` (recipe v2)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recon.candidates import Candidates
from recon.logits_client import LogitsClient, softmax
from recon.scoring import pairwise_mse


def logits_swap(
    images: np.ndarray,
    labels: np.ndarray,
    pool_for: Callable[[int], Candidates],
    client: LogitsClient,
    *,
    n_swap: int = 20,
    min_mse_to_class: float = 0.002,
    medoid_kind: str = "nearest",
) -> tuple[np.ndarray, dict]:
    """One logits call; the n_swap images least probable for their own class are replaced, one by one, by
    the pool candidate farthest (max-min MSE) from the rest of its class, skipping any within
    `min_mse_to_class` of the class."""
    probs = softmax(client.logits(images))
    own = probs[np.arange(len(images)), labels]
    worst = np.argsort(own, kind="stable")[:n_swap]
    out = images.copy()
    swapped = 0
    for i in worst:  # one pass over the (few) images to swap; distances are vectorised
        c = int(labels[i])
        pool = pool_for(c)
        cand = np.flatnonzero((pool.kind == "centroid") | (pool.kind == medoid_kind))
        rest = np.flatnonzero((labels == c) & (np.arange(len(out)) != i))
        # a class-free solver may leave an image alone in its class: then any candidate is far enough
        d = pairwise_mse(pool.images[cand], out[rest]).min(axis=1) if len(rest) else np.full(len(cand), np.inf)
        ok = d >= min_mse_to_class
        if not ok.any():
            continue
        best = cand[ok][np.argmax(d[ok])]
        out[i] = pool.images[best]
        swapped += 1
    return out, {"n_swapped": swapped, "mean_own_prob_before": float(own.mean())}


def light_optimize(
    images: np.ndarray,
    labels: np.ndarray,
    client: LogitsClient,
    *,
    rounds: int = 5,
    sigma: float = 0.01,
    max_drift_mse: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Noise every image; keep a change if the classifier's max confidence rises, revert on drift."""
    rng = np.random.default_rng([seed, 11])
    start = images.copy()
    cur = images.copy()
    conf = softmax(client.logits(cur)).max(axis=1)
    accepted = 0
    for _ in range(rounds):
        trial = np.clip(cur + rng.normal(0.0, sigma, cur.shape).astype(np.float32), 0.0, 1.0)
        new_conf = softmax(client.logits(trial)).max(axis=1)
        drift = ((trial - start) ** 2).reshape(len(cur), -1).mean(axis=1)
        keep = (new_conf > conf) & (drift <= max_drift_mse)
        cur[keep], conf[keep] = trial[keep], new_conf[keep]
        accepted += int(keep.sum())
    return cur.astype(np.float32), {"n_accepted": accepted}
