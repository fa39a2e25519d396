"""Objective-aware solvers: each optimises one scoring rule, with its free settings chosen on held-out folds.

Why they beat the recipes: for a target t from a cluster with mean mu and covariance Sigma,
E||x - t||^2 = ||x - mu||^2 + tr(Sigma). A sharp real image pays tr(Sigma) twice; a mean pays it once. So:
- `shrinkage`: k-means centroids pulled toward the class mean by a factor fitted on held-out folds;
- `matching_quantiser` (for `matching`): the n images minimising the expected one-to-one assignment cost to
  random n-image draws of the class (Lloyd steps with Hungarian assignments over bootstrap draws, i.e. a
  free-support Wasserstein barycenter), then shrunk;
- `coverage` (the k-means objective over targets): k-means++ restarts, the restart and a shrinkage chosen on
  held-out folds;
- `nearest`: means of the m nearest neighbours at the densest points; duplicates allowed (`distinct: false`),
  or kept apart (`distinct: true`, for `matching_train`).
Every solver works per class on arrays and returns (images, labels); with `allocation="global"`, `coverage`
and `nearest` instead share the images across classes (`recon.allocation`), tuned on pooled folds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from recon.allocation import claim_prototypes, dense_global, global_kmeans, greedy_apart, soft_kmeans
from recon.candidates import class_stream
from recon.dataset_io import Dataset
from recon.metrics import class_rule_score, fold_ids, pooled_rule_score
from recon.scoring import pairwise_mse

SOLVERS = ("shrinkage", "matching_quantiser", "coverage", "nearest")
ALLOCATIONS = ("per_class", "global")
GLOBAL_SOLVERS = ("coverage", "nearest")


@dataclass
class Solution:
    images: np.ndarray
    labels: np.ndarray
    info: dict = field(default_factory=dict)


# --- building blocks (one class's images in, n images out) ----------------------------------------------


def kmeans_centroids(x: np.ndarray, n: int, random_state: int, n_init: int = 1) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    km = KMeans(n_clusters=n, n_init=n_init, random_state=random_state).fit(flat)
    return km.cluster_centers_.astype(np.float32).reshape((n, *x.shape[1:]))


def shrink(images: np.ndarray, x: np.ndarray, alpha: float) -> np.ndarray:
    """Pull toward the class mean: alpha=0 keeps the images, alpha=1 gives the mean."""
    mu = x.mean(axis=0, keepdims=True)
    return np.clip(mu + (1.0 - alpha) * (images - mu), 0.0, 1.0).astype(np.float32)


def matching_quantiser(x: np.ndarray, n: int, *, iters: int = 20, draws: int = 100, seed: int = 0,
                       init: np.ndarray | None = None) -> np.ndarray:
    """Lloyd's algorithm with one-to-one (Hungarian) assignments against bootstrap n-image draws of x.

    Each step: draw `draws` random n-subsets, assign each subset one-to-one to the current n images, and move
    every image to the mean of what it was assigned. The fixed point minimises the expected matching cost."""
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1).astype(np.float64)
    s = (init if init is not None else kmeans_centroids(x, n, seed)).reshape(n, -1).astype(np.float64)
    x2 = (flat * flat).sum(1)
    for _ in range(iters):
        subsets = np.argsort(rng.random((draws, len(x))), axis=1)[:, :n]  # `draws` random n-subsets
        d = (s * s).sum(1)[:, None] + x2[None, :] - 2.0 * s @ flat.T  # (n, len(x)), once per step
        owner = np.empty((draws, n), dtype=np.int64)
        for b in range(draws):  # one small assignment per draw; distances are shared and vectorised
            rows, cols = linear_sum_assignment(d[:, subsets[b]])
            owner[b, rows] = subsets[b, cols]
        s = flat[owner].mean(axis=0)
    return np.clip(s, 0.0, 1.0).astype(np.float32).reshape((n, *x.shape[1:]))


def local_means(x: np.ndarray, m: int, d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every image, the mean of its m nearest neighbours (itself included), and a density score:
    that mean's average distance to its m nearest images (lower = denser)."""
    d = pairwise_mse(x, x) if d is None else d
    m = min(m, len(x))
    nn = np.argsort(d, axis=1, kind="stable")[:, :m]
    means = x[nn].mean(axis=1).astype(np.float32)
    dm = pairwise_mse(means, x)
    density = np.sort(dm, axis=1)[:, : max(m, 3)].mean(axis=1)
    return means, density


def dense_prototypes(x: np.ndarray, n: int, m: int, *, distinct: bool, min_sep: float = 0.0,
                     d: np.ndarray | None = None) -> np.ndarray:
    """n local means at the densest points; one repeated n times unless `distinct`."""
    means, density = local_means(x, m, d)
    order = np.argsort(density, kind="stable")
    if not distinct:
        return np.repeat(means[order[:1]], n, axis=0)
    return means[greedy_apart(order, pairwise_mse(means, means), n, min_sep)]


# --- choosing settings on held-out folds ----------------------------------------------------------------


Base = Callable[[np.ndarray, int], object]  # (class images, class) -> anything the finishers share
Finish = Callable[[object, np.ndarray, object], np.ndarray]  # (base, class images, setting) -> n images


FoldScores = Callable[[Dataset, Dataset, list], np.ndarray]  # (in-folds, held-out fold, grid) -> a score each


def _cross_fit(aux: Dataset, grid: Sequence, folds: int, seed: int, fold_scores: FoldScores) -> tuple[object, dict]:
    """The grid value with the lowest score averaged over the folds, and every value's score."""
    grid = list(grid)
    if len(grid) == 1:
        return grid[0], {}
    ids = fold_ids(aux.labels, folds, seed)
    scores = sum(fold_scores(aux.subset(ids != f), aux.subset(ids == f), grid) for f in range(folds)) / folds
    best = int(np.argmin(scores))
    return grid[best], {str(v): float(s) for v, s in zip(grid, scores)}


def tune(aux: Dataset, base: Base, finish: Finish, grid: Sequence, *, rule: str, per_class: int, folds: int,
         seed: int, num_classes: int = 10, train_per_class: int | None = None) -> tuple[object, dict]:
    """The grid value with the lowest cross-fitted score under `rule` (one value for all classes).

    `base` runs once per fold and class; `finish` applies each setting to it cheaply."""
    def fold_scores(inn: Dataset, held: Dataset, grid: list) -> np.ndarray:
        scores = np.zeros(len(grid))
        for c in range(num_classes):
            x, t = inn.of_class(c), held.of_class(c)
            b = base(x, c)
            scores += [class_rule_score(rule, finish(b, x, v), t, per_class, train_per_class) for v in grid]
        return scores / num_classes

    return _cross_fit(aux, grid, folds, seed, fold_scores)


PooledBase = Callable[[Dataset], object]  # in-fold aux -> work every setting shares
PooledFinish = Callable[[object, Dataset, object], tuple[np.ndarray, np.ndarray]]  # -> (images, labels)


def tune_pooled(aux: Dataset, base: PooledBase, finish: PooledFinish, grid: Sequence, *, rule: str,
                per_class: int, folds: int, seed: int, num_classes: int = 10,
                train_per_class: int | None = None) -> tuple[object, dict]:
    """`tune` for class-free solvers: each setting builds on the in-folds of all classes at once and is scored
    against the whole held-out fold (`pooled_rule_score`)."""
    def fold_scores(inn: Dataset, held: Dataset, grid: list) -> np.ndarray:
        b = base(inn)
        return np.array([pooled_rule_score(rule, finish(b, inn, v)[0], held.images, per_class, num_classes,
                                           train_per_class) for v in grid])

    return _cross_fit(aux, grid, folds, seed, fold_scores)


# --- the solvers ---------------------------------------------------------------------------------------


def _per_class(aux: Dataset, fn: Callable[[np.ndarray, int], np.ndarray], num_classes: int):
    parts = [fn(aux.of_class(c), c) for c in range(num_classes)]
    images = np.concatenate(parts).astype(np.float32)
    labels = np.concatenate([np.full(len(p), c) for c, p in enumerate(parts)]).astype(np.int64)
    return images, labels


@dataclass(frozen=True)
class SolverSpec:
    """A solver and its settings; list-valued settings are grids searched on held-out folds."""

    name: str
    rule: str
    per_class: int = 10
    seed: int = 0
    folds: int = 5
    alpha: Sequence[float] = (0.0,)
    iters: int = 20
    draws: int = 100
    restarts: int = 1
    first_restart: int = 0
    m: Sequence[int] = (8,)
    distinct: bool = False
    min_sep: Sequence[float] = (0.0,)
    num_classes: int = 10
    train_per_class: int | None = None  # expected |T| per class, for the matching_train size correction
    allocation: str = "per_class"  # or "global": classes share the n * num_classes images (coverage, nearest)
    select: Sequence[str] = ("greedy",)  # global nearest, distinct: "greedy" (densest, apart) and/or "claim"
    temperature: Sequence[float] = (0.0,)  # global coverage: soft k-means temperature (0: plain k-means)


def solve(aux: Dataset, spec: SolverSpec) -> Solution:
    """Fit `spec` on aux: settings chosen on held-out folds of aux, then the final build on all of it."""
    if spec.name not in SOLVERS:
        raise ValueError(f"solver={spec.name!r}: choose one of {', '.join(SOLVERS)} (or seed)")
    if spec.allocation not in ALLOCATIONS:
        raise ValueError(f"solver.allocation={spec.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    if spec.allocation == "global":
        return _solve_global(aux, spec)
    n, s = spec.per_class, spec.seed
    kw = {"rule": spec.rule, "per_class": n, "folds": spec.folds, "seed": s, "num_classes": spec.num_classes,
          "train_per_class": spec.train_per_class}
    info: dict = {}
    if spec.name in ("shrinkage", "matching_quantiser"):
        if spec.name == "shrinkage":
            def base(x, c):
                return kmeans_centroids(x, n, class_stream(s, 0, c))
        else:
            def base(x, c):
                init = kmeans_centroids(x, n, class_stream(s, 0, c))
                return matching_quantiser(x, n, iters=spec.iters, draws=spec.draws, seed=class_stream(s, 1, c),
                                          init=init)
        alpha, info["alpha_scores"] = tune(aux, base, lambda b, x, a: shrink(b, x, a), spec.alpha, **kw)
        info["alpha"] = alpha
        images, labels = _per_class(aux, lambda x, c: shrink(base(x, c), x, alpha), spec.num_classes)
    elif spec.name == "coverage":
        restarts = list(range(spec.first_restart, spec.first_restart + spec.restarts))

        def base(x, c):
            return {r: kmeans_centroids(x, n, class_stream(s, r, c)) for r in restarts}

        grid = [(r, a) for r in restarts for a in spec.alpha]
        (r_best, alpha), info["scores"] = tune(aux, base, lambda b, x, v: shrink(b[v[0]], x, v[1]), grid, **kw)
        info.update(restart=r_best, alpha=alpha)
        images, labels = _per_class(
            aux, lambda x, c: shrink(kmeans_centroids(x, n, class_stream(s, r_best, c)), x, alpha), spec.num_classes
        )
    else:  # nearest
        grid = [(m, sep) for m in spec.m for sep in (spec.min_sep if spec.distinct else (0.0,))]

        def base(x, c):
            return pairwise_mse(x, x)

        def finish(d, x, v):
            return dense_prototypes(x, n, v[0], distinct=spec.distinct, min_sep=v[1], d=d)

        (m, sep), info["scores"] = tune(aux, base, finish, grid, **kw)
        info.update(m=m, min_sep=sep)
        images, labels = _per_class(aux, lambda x, c: finish(base(x, c), x, (m, sep)), spec.num_classes)
    return Solution(images, labels, info)


def _solve_global(aux: Dataset, spec: SolverSpec) -> Solution:
    """Class-free allocation (`recon.allocation`): per_class * num_classes images shared by all classes."""
    if spec.name not in GLOBAL_SOLVERS:
        raise ValueError(f"solver.allocation=global works with {' and '.join(GLOBAL_SOLVERS)}, not {spec.name!r}")
    total = spec.per_class * spec.num_classes
    kw = {"rule": spec.rule, "per_class": spec.per_class, "folds": spec.folds, "seed": spec.seed,
          "num_classes": spec.num_classes, "train_per_class": spec.train_per_class}
    if spec.name == "coverage":
        def base(d: Dataset, restarts: int = 1):  # the folds only choose a temperature: one start
            return global_kmeans(d.images, d.labels, total, restarts=restarts,
                                 seed=class_stream(spec.seed, spec.first_restart, 0), num_classes=spec.num_classes)

        def finish(b, d: Dataset, t):
            return (soft_kmeans(d.images, b[0], t), b[1]) if t > 0 else b

        t, scores = tune_pooled(aux, base, finish, spec.temperature, **kw)
        images, labels = finish(base(aux, restarts=spec.restarts), aux, t)
        return Solution(images, labels, {"scores": scores, "temperature": t})
    train_size = spec.train_per_class * spec.num_classes if spec.train_per_class else len(aux)

    def build(dist, d: Dataset, v):
        select, m, sep = v
        if select == "claim":
            return claim_prototypes(d.images, d.labels, total, m, train_size, dist)
        if not spec.distinct:  # one prototype, repeated: free under `nearest`
            one, label = dense_global(d.images, d.labels, 1, m, 0.0, dist)
            return np.repeat(one, total, axis=0), np.repeat(label, total)
        return dense_global(d.images, d.labels, total, m, sep, dist)

    for sel in spec.select:
        if sel not in ("greedy", "claim"):
            raise ValueError(f"solver.select={sel!r}: choose greedy and/or claim")
    grid = [("claim", m, 0.0) if sel == "claim" else (sel, m, sep)
            for sel in spec.select for m in spec.m
            for sep in (spec.min_sep if sel == "greedy" and spec.distinct else (0.0,))]
    best, scores = tune_pooled(aux, lambda d: pairwise_mse(d.images, d.images), build, list(dict.fromkeys(grid)),
                               **kw)
    select, m, sep = best
    images, labels = build(None, aux, best)
    return Solution(images, labels, {"scores": scores, "select": select, "m": m, "min_sep": sep})


def fixed(spec: SolverSpec, info: dict) -> SolverSpec:
    """The spec with its tuned settings frozen: what the held-out metric re-runs on each fold."""
    if spec.allocation == "global":
        if spec.name == "coverage":
            return replace(spec, temperature=(info["temperature"],))
        return replace(spec, select=(info["select"],), m=(info["m"],), min_sep=(info["min_sep"],))
    if spec.name in ("shrinkage", "matching_quantiser"):
        return replace(spec, alpha=(info["alpha"],))
    if spec.name == "coverage":
        return replace(spec, alpha=(info["alpha"],), first_restart=info["restart"], restarts=1)
    return replace(spec, m=(info["m"],), min_sep=(info["min_sep"],))
