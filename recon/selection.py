"""Choose each class's submitted images from its candidates: blend by medoid ratio, dedup, rank.

Rankings:
- `class_mean`: nearest the class mean first (recipe C). E||x - t||^2 = ||x - mu||^2 + tr(Sigma), so this
  is the expected error against a random same-class target.
- `proxy`: the leave-one-out mean MSE to the class's aux images: the same expectation, estimated without
  letting a member score against itself.
- `farthest`: greedy farthest-point sampling from the candidate nearest the mean (recipes D/E/F, v2).
"""

from __future__ import annotations

import numpy as np

from recon.scoring import pairwise_mse

RANKINGS = ("class_mean", "proxy", "farthest")


class SelectionError(ValueError):
    pass


def mean_distance(images: np.ndarray, class_images: np.ndarray) -> np.ndarray:
    mu = class_images.mean(axis=0, keepdims=True)
    return pairwise_mse(images, mu)[:, 0]


def loo_proxy(images: np.ndarray, class_images: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Mean MSE to the class's images, leaving out the candidate itself when it is one of them."""
    d = pairwise_mse(images, class_images)
    n = len(class_images)
    is_member = member >= 0
    total = d.sum(axis=1)
    total[is_member] -= d[np.flatnonzero(is_member), member[is_member]]
    return total / np.where(is_member, n - 1, n)


def dedup(order: np.ndarray, d: np.ndarray, threshold: float) -> np.ndarray:
    """Walk candidates in priority order; drop any within `threshold` per-pixel MSE of one already kept."""
    if threshold <= 0:
        return order
    kept: list[int] = []
    for i in order:  # one pass over candidates, vector ops per step
        if not kept or d[i, kept].min() >= threshold:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def farthest_point(
    pool: np.ndarray, d: np.ndarray, n: int, *, start: list[int] | None = None, bonus: np.ndarray | None = None
) -> list[int]:
    """Greedy max-min selection of n from `pool`, continuing from `start` (or from pool[0])."""
    chosen = list(start or [])
    pool = [int(i) for i in pool if i not in set(chosen)]
    picked: list[int] = []
    if not chosen and pool and n > 0:
        picked.append(pool.pop(0))
    while len(picked) < n and pool:
        ref = chosen + picked
        gain = d[np.ix_(pool, ref)].min(axis=1)
        if bonus is not None:
            gain = gain * (1.0 + bonus[pool])
        picked.append(pool.pop(int(np.argmax(gain))))
    return picked


def select_class(
    images: np.ndarray,
    kinds: np.ndarray,
    member: np.ndarray,
    class_images: np.ndarray,
    *,
    per_class: int,
    medoid_ratio: float | None,
    dedup_threshold: float,
    ranking: str,
    medoid_kind: str = "nearest",
    centroid_preference: float = 0.0,
) -> np.ndarray:
    """Indices into the candidates of one class, in selection order."""
    if ranking not in RANKINGS:
        raise SelectionError(f"pipeline.ranking={ranking!r}: choose one of {', '.join(RANKINGS)}")
    if medoid_kind not in ("nearest", "medoid"):
        raise SelectionError(f"pipeline.medoid_kind={medoid_kind!r}: choose nearest or medoid")
    if medoid_ratio is not None and not 0.0 <= medoid_ratio <= 1.0:
        raise SelectionError(f"pipeline.medoid_ratio={medoid_ratio}: must be in [0, 1] or null")
    in_pool = (kinds == "centroid") | (kinds == medoid_kind)
    score = loo_proxy(images, class_images, member) if ranking == "proxy" else mean_distance(images, class_images)
    idx = np.flatnonzero(in_pool)
    order = idx[np.argsort(score[idx], kind="stable")]
    d = pairwise_mse(images, images)
    order = dedup(order, d, dedup_threshold)
    if len(order) < per_class:
        raise SelectionError(
            f"only {len(order)} distinct candidates after dedup (pipeline.dedup_threshold={dedup_threshold}); "
            f"need pipeline.per_class={per_class}: raise pipeline.k or pipeline.seeds, or lower the threshold"
        )
    is_c = kinds == "centroid"
    bonus = np.where(is_c, centroid_preference, 0.0)
    if medoid_ratio is None:  # free blend: the ranking alone decides
        if ranking == "farthest":
            return np.asarray(farthest_point(order, d, per_class, bonus=bonus))
        return order[:per_class]
    n_m = int(round(medoid_ratio * per_class))
    cents, meds = order[is_c[order]], order[~is_c[order]]
    n_c = min(per_class - n_m, len(cents))
    n_m = per_class - n_c  # a short centroid pool is filled with medoids, and vice versa
    if n_m > len(meds):
        n_m, n_c = len(meds), per_class - len(meds)
    if ranking == "farthest":
        chosen = farthest_point(cents, d, n_c)
        chosen += farthest_point(meds, d, n_m, start=chosen)
        return np.asarray(chosen)
    return np.concatenate([cents[:n_c], meds[:n_m]])
