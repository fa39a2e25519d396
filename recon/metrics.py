"""Run metrics: the in-sample proxy, diversity, and the cross-fitted held-out estimate of each rule."""

from __future__ import annotations

import numpy as np

from recon import scoring
from recon.dataset_io import Dataset
from recon.reconstruct import CandidateFn, Params, reconstruct
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


def _rule_scores(sub: np.ndarray, sub_labels: np.ndarray, held: Dataset, per_class: int,
                 num_classes: int) -> dict[str, np.ndarray]:
    """Each rule per class (held-out images stand in for T; target sets G are halves of them, averaged)."""
    out = {r: np.zeros(num_classes) for r in scoring.RULES}
    for c in range(num_classes):
        s, t = sub[sub_labels == c], held.of_class(c)
        n_draws = max(1, len(t) // per_class)
        draws = [t[i * per_class:(i + 1) * per_class] for i in range(n_draws)] if len(t) >= per_class else [t]
        out["nearest"][c] = scoring.score_nearest(s, t)
        out["matching_train"][c] = scoring.score_matching_train(s, t)
        out["matching"][c] = np.mean([scoring.score_matching(s, g) for g in draws])
        out["coverage"][c] = np.mean([scoring.score_coverage(s, g) for g in draws])
    return out


def holdout_scores(
    aux: Dataset, p: Params, *, folds: int = 5, seed: int = 0, candidate_fn: CandidateFn | None = None
) -> dict[str, float]:
    """Cross-fitted estimate of every rule: build on the in-folds, score on the held-out fold, average.

    Class-restricted scoring (each class's submissions against that class's held-out images) is what the
    per-class metrics report; the headline `holdout_<rule>` is their mean over classes.
    """
    ids = fold_ids(aux.labels, folds, seed)
    acc = {r: [] for r in scoring.RULES}
    for f in range(folds):
        train_f, held_f = aux.subset(ids != f), aux.subset(ids == f)
        kwargs = {"candidate_fn": candidate_fn} if candidate_fn else {}
        rec = reconstruct(train_f, p, progress=False, **kwargs)
        scores = _rule_scores(rec.images, rec.labels, held_f, p.per_class, p.num_classes)
        for r in scoring.RULES:
            acc[r].append(scores[r])
    out: dict[str, float] = {}
    for r in scoring.RULES:
        out.update(_with_per_class(f"holdout_{r}", np.mean(acc[r], axis=0)))
    return out
