"""Run metrics: the in-sample proxy, diversity, and the cross-fitted held-out estimate of each rule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from recon import scoring
from recon.dataset_io import Dataset
from recon.scoring import pairwise_mse


def _present(name: str, values: dict[int, float], headline: float) -> dict[str, float]:
    """A headline plus one value per class that has one (class-free solvers may leave a class empty)."""
    return {name: float(headline), **{f"{name}_c{c}": float(v) for c, v in values.items()}}


def proxy_mse(images: np.ndarray, labels: np.ndarray, aux: Dataset, num_classes: int = 10) -> dict[str, float]:
    """Mean MSE to the nearest same-class aux image. Biased: a medoid scores 0 against its own pool."""
    near = np.empty(len(images))
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            near[mask] = pairwise_mse(images[mask], aux.of_class(c)).min(axis=1)
    per = {c: near[labels == c].mean() for c in range(num_classes) if (labels == c).any()}
    return _present("proxy_mse", per, near.mean())  # the mean over images, whatever the class counts


def diversity(images: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> dict[str, float]:
    """Within-class pairwise MSE (mean and min), averaged over the classes that hold two images or more."""
    means, mins = {}, {}
    for c in range(num_classes):
        x = images[labels == c]
        if len(x) < 2:
            continue
        d = pairwise_mse(x, x)[np.triu_indices(len(x), 1)]
        means[c], mins[c] = d.mean(), d.min()
    return {**_present("diversity_mean_pairwise_mse", means, np.mean(list(means.values())) if means else 0.0),
            **_present("diversity_min_pairwise_mse", mins, np.mean(list(mins.values())) if mins else 0.0)}


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
    rank = np.arange(m - n + 1)  # a larger rank leaves too few bigger columns to fill the subset
    # P(the rank-th smallest is the subset's minimum) = C(m-1-rank, n-1) / C(m, n), in logs: C(1000, 500) overflows
    log_w = (gammaln(m - rank) - gammaln(n) - gammaln(m - rank - n + 1)
             - gammaln(m + 1) + gammaln(n + 1) + gammaln(m - n + 1))
    return np.sort(d, axis=1)[:, : m - n + 1] @ np.exp(log_w)


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


def pooled_rule_score(rule: str, s: np.ndarray, held: np.ndarray, per_class: int, num_classes: int,
                      train_per_class: int | None = None) -> float:
    """`class_rule_score` with classes ignored, as the rules themselves do: all submissions against the whole
    held-out fold, target draws of per_class * num_classes held-out images (in aux order, which is shuffled,
    so roughly per_class of each class), |T| = train_per_class * num_classes."""
    return class_rule_score(rule, s, held, per_class * num_classes,
                            train_per_class * num_classes if train_per_class else None)


Builder = Callable[[Dataset], tuple[np.ndarray, np.ndarray]]


def holdout_scores(
    aux: Dataset, build: Builder, *, per_class: int = 10, folds: int = 5, seed: int = 0, num_classes: int = 10,
    rules: tuple[str, ...] = scoring.RULES, train_per_class: int | None = None, repeats: int = 1,
    pooled: bool = False,
) -> dict[str, float]:
    """Cross-fitted estimate of each rule: build on the in-folds, score on the held-out fold, average.

    `build(in_fold_aux) -> (images, labels)`. Each class's submissions are scored against that class's held-out
    images (`class_rule_score`); the headline `holdout_<rule>` is the mean over classes, reported per class too.
    With `pooled` (class-free solvers, whose class counts vary) all submissions are scored against the whole
    held-out fold instead (`pooled_rule_score`), and only the headline is reported.
    """
    acc = {r: np.zeros((repeats * folds, 1 if pooled else num_classes)) for r in rules}
    splits = [(fold_ids(aux.labels, folds, seed + rep), f) for rep in range(repeats) for f in range(folds)]
    for i, (ids, f) in enumerate(splits):  # `repeats` different K-fold splits, averaged: less noise
        images, labels = build(aux.subset(ids != f))
        held = aux.subset(ids == f)
        for r in rules:
            if pooled:
                acc[r][i, 0] = pooled_rule_score(r, images, held.images, per_class, num_classes, train_per_class)
                continue
            for c in range(num_classes):
                acc[r][i, c] = class_rule_score(r, images[labels == c], held.of_class(c), per_class,
                                                train_per_class)
    out: dict[str, float] = {}
    for r in rules:
        per = acc[r].mean(axis=0)
        out.update(_present(f"holdout_{r}", {} if pooled else dict(enumerate(per)), per.mean()))
    return out
