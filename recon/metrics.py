"""Run metrics: the in-sample proxy, diversity, and the cross-fitted held-out estimate of each rule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import comb

from recon import scoring
from recon.dataset_io import Dataset
from recon.scoring import pairwise_mse


def _with_per_class(name: str, per_class: np.ndarray) -> dict[str, float]:
    out = {name: float(np.mean(per_class))}
    out.update({f"{name}_c{c}": float(v) for c, v in enumerate(per_class)})
    return out


def proxy_mse(images: np.ndarray, labels: np.ndarray, aux: Dataset, num_classes: int = 10) -> dict[str, float]:
    """Mean MSE to the nearest same-class aux image. Biased: a medoid scores 0 against its own pool."""
    per = np.array([
        pairwise_mse(images[labels == c], aux.of_class(c)).min(axis=1).mean() for c in range(num_classes)
    ])
    return _with_per_class("proxy_mse", per)  # classes hold equal counts, so this is the mean over images


def diversity(images: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> dict[str, float]:
    """Within-class pairwise MSE (mean and min), averaged over classes."""
    means, mins = [], []
    for c in range(num_classes):
        x = images[labels == c]
        d = pairwise_mse(x, x)
        iu = np.triu_indices(len(x), 1)
        means.append(d[iu].mean() if len(iu[0]) else 0.0)
        mins.append(d[iu].min() if len(iu[0]) else 0.0)
    return {**_with_per_class("diversity_mean_pairwise_mse", np.array(means)),
            **_with_per_class("diversity_min_pairwise_mse", np.array(mins))}


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified fold id of each aux image: every class is spread evenly over the folds."""
    rng = np.random.default_rng([seed, 7])
    ids = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        ids[members] = np.arange(len(members)) % folds
    return ids


def expected_nearest(d: np.ndarray, n: int) -> np.ndarray:
    """Per row, the exact expected minimum over a random n-subset of the columns (from sorted distances)."""
    m = d.shape[1]
    rank = np.arange(m)
    weights = comb(m - 1 - rank, n - 1) / comb(m, n)  # P(the rank-th smallest is the subset's minimum)
    return np.sort(d, axis=1) @ weights


def extrapolated_nearest(d: np.ndarray, train_per_class: int | None) -> np.ndarray:
    """Each submission's nearest-neighbour distance, extrapolated from a small fold to |T| per class.

    A fold holds far fewer images than T, and the nearest of fewer images is farther: that flatters blurry
    images, whose distance barely falls as images are added, over sharp ones near dense regions. Fit
    log E[min over n] against log n on subsets of the fold (exact expectations), then extrapolate to |T|."""
    m = d.shape[1]
    if not train_per_class or train_per_class <= m or m < 4:
        return d.min(axis=1)
    ns = np.unique(np.round(np.geomspace(max(2, m // 4), m, 4)).astype(int))
    x = np.log(ns)
    y = np.log(np.maximum(np.stack([expected_nearest(d, n) for n in ns], axis=1), 1e-12))
    slope = ((x - x.mean()) * (y - y.mean(axis=1, keepdims=True))).sum(axis=1) / ((x - x.mean()) ** 2).sum()
    return d.min(axis=1) * (train_per_class / m) ** np.minimum(slope, 0.0)


def class_rule_score(rule: str, s: np.ndarray, held: np.ndarray, per_class: int,
                     train_per_class: int | None = None) -> float:
    """One class's submissions scored against that class's held-out images under `rule`.

    Held-out images stand in for T; the target sets G of `matching`/`coverage` are disjoint draws of
    per_class of them, averaged. With `train_per_class` (|T| per class), the two rules against T are
    size-corrected: `nearest` is extrapolated to |T| (`extrapolated_nearest`); for `matching_train` the
    submissions are matched in chunks of len(s) * len(held) / |T| (at least 1), keeping the ratio |S|/|T|, and
    the chunk cost is scaled by the same extrapolation."""
    if rule in ("nearest", "matching_train"):
        d = scoring.pairwise_mse(s, held)
        near = extrapolated_nearest(d, train_per_class)
        if rule == "nearest":
            return float(near.mean())
        size = len(s) if not train_per_class else max(1, round(len(s) * len(held) / train_per_class))
        costs = []
        for start in range(0, len(s), size):  # a handful of chunks; each is one small assignment
            block = d[start : start + size]
            rows, cols = linear_sum_assignment(block)
            costs.append(block[rows, cols])
        chunked = float(np.concatenate(costs).mean())
        return chunked * float(near.mean()) / max(float(d.min(axis=1).mean()), 1e-12)
    n_draws = max(1, len(held) // per_class)
    draws = [held[i * per_class:(i + 1) * per_class] for i in range(n_draws)] if len(held) >= per_class else [held]
    fn = scoring.score_matching if rule == "matching" else scoring.score_coverage
    return float(np.mean([fn(s, g) for g in draws]))


Builder = Callable[[Dataset], tuple[np.ndarray, np.ndarray]]


def holdout_scores(
    aux: Dataset, build: Builder, *, per_class: int = 10, folds: int = 5, seed: int = 0, num_classes: int = 10,
    rules: tuple[str, ...] = scoring.RULES, train_per_class: int | None = None, repeats: int = 1,
) -> dict[str, float]:
    """Cross-fitted estimate of each rule: build on the in-folds, score on the held-out fold, average.

    `build(in_fold_aux) -> (images, labels)`. Each class's submissions are scored against that class's held-out
    images (`class_rule_score`); the headline `holdout_<rule>` is the mean over classes, reported per class too.
    """
    acc = {r: np.zeros((repeats * folds, num_classes)) for r in rules}
    splits = [(fold_ids(aux.labels, folds, seed + rep), f) for rep in range(repeats) for f in range(folds)]
    for i, (ids, f) in enumerate(splits):  # `repeats` different K-fold splits, averaged: less noise
        images, labels = build(aux.subset(ids != f))
        held = aux.subset(ids == f)
        for c in range(num_classes):
            s, t = images[labels == c], held.of_class(c)
            for r in rules:
                acc[r][i, c] = class_rule_score(r, s, t, per_class, train_per_class)
    out: dict[str, float] = {}
    for r in rules:
        out.update(_with_per_class(f"holdout_{r}", acc[r].mean(axis=0)))
    return out
