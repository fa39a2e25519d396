"""Class-free solvers: the exact k-cardinality assignment, the global prototypes and k-means, the pooled
held-out tuning and metrics, the redrawn-target scores, and the wiring into the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from recon.allocation import (
    claim_prototypes,
    dense_global,
    global_kmeans,
    greedy_apart,
    kcard_pairs,
    same_class_neighbours,
    soft_kmeans,
)
from recon.dataset_io import Dataset
from recon.metrics import class_rule_score, diversity, holdout_scores, pooled_rule_score, proxy_mse
from recon.pipeline import run
from recon.scoring import RULES, pairwise_mse, redrawn_target_scores, score_coverage, score_matching
from recon.solvers import SolverSpec, fixed, solve

SHAPE = (3, 4, 4)


def tight_and_spread(per=30, seed=0):
    """Class 0 is a tight blob, classes 1 and 2 are spread out: a class-free solver should favour class 0."""
    rng = np.random.default_rng(seed)
    spreads = [0.01, 0.2, 0.2]
    x = np.concatenate([rng.uniform(0.3, 0.7, (1, *SHAPE)) + s * rng.standard_normal((per, *SHAPE))
                        for s in spreads])
    labels = np.repeat(np.arange(3), per)
    perm = rng.permutation(len(x))
    return Dataset(np.clip(x, 0, 1).astype(np.float32)[perm], labels[perm].astype(np.int64))


def brute_kcard(cost, k):
    n, m = cost.shape
    best = np.inf
    for rows in itertools.combinations(range(n), k):
        for cols in itertools.permutations(range(m), k):
            best = min(best, cost[list(rows), list(cols)].sum())
    return best


@pytest.mark.parametrize("shape,k", [((5, 4), 2), ((4, 6), 3), ((5, 5), 5), ((6, 5), 1)])
def test_kcard_pairs_is_the_exact_minimum(shape, k):
    cost = np.random.default_rng(sum(shape) + k).random(shape)
    pairs = kcard_pairs(cost, k)
    assert len(pairs) == k
    assert len({r for r, _ in pairs}) == k and len({c for _, c in pairs}) == k
    assert sum(cost[p] for p in pairs) == pytest.approx(brute_kcard(cost, k))
    assert [cost[p] for p in pairs] == sorted(cost[p] for p in pairs)


def test_same_class_neighbours_stay_in_class_and_start_with_self():
    aux = tight_and_spread()
    nn = same_class_neighbours(aux.images, aux.labels, 4)
    assert nn.shape == (len(aux.images), 4)
    np.testing.assert_array_equal(nn[:, 0], np.arange(len(aux.images)))
    assert (aux.labels[nn] == aux.labels[:, None]).all()


def test_greedy_apart_keeps_distance_then_fills():
    pts = np.array([0.0, 0.1, 1.0, 1.05, 3.0])
    d = np.abs(pts[:, None] - pts[None, :])
    assert greedy_apart(np.arange(5), d, 3, 0.5) == [0, 2, 4]
    assert greedy_apart(np.arange(5), d, 5, 0.5) == [0, 2, 4, 1, 3]  # too few far apart: the next best


def test_global_prototypes_favour_the_tight_class_and_are_deterministic():
    aux = tight_and_spread()
    for images, labels in (dense_global(aux.images, aux.labels, 12, 4, 0.0),
                           claim_prototypes(aux.images, aux.labels, 12, 4, train_size=len(aux.images))):
        assert images.shape == (12, *SHAPE) and images.dtype == np.float32
        assert (np.diff(labels) >= 0).all()  # sorted by label
        assert np.bincount(labels, minlength=3)[0] > 4  # more than an equal share goes to the tight class
    a = claim_prototypes(aux.images, aux.labels, 12, 4, train_size=len(aux.images))
    b = claim_prototypes(aux.images, aux.labels, 12, 4, train_size=len(aux.images))
    np.testing.assert_array_equal(a[0], b[0])


def test_claim_repeats_candidates_when_train_is_denser_than_aux():
    aux = tight_and_spread()
    images, _ = claim_prototypes(aux.images, aux.labels, 12, 4, train_size=4 * len(aux.images))
    distinct = np.unique(images.reshape(12, -1), axis=0)
    assert len(distinct) == 3  # 12 * 90 / 360 = 3 claims, each repeated 4 times


def test_dense_global_respects_min_sep():
    aux = tight_and_spread()
    images, _ = dense_global(aux.images, aux.labels, 6, 4, min_sep=0.01)
    d = pairwise_mse(images, images) + np.eye(6)
    assert d.min() > 0.01


def test_global_kmeans_labels_by_majority():
    aux = tight_and_spread()
    images, labels = global_kmeans(aux.images, aux.labels, 6, restarts=2, seed=0, num_classes=3)
    assert images.shape == (6, *SHAPE)
    nearest_member = pairwise_mse(images, aux.images).argmin(axis=1)
    assert (aux.labels[nearest_member] == labels).mean() >= 5 / 6


def test_soft_kmeans_limits():
    aux = tight_and_spread()
    centres, _ = global_kmeans(aux.images, aux.labels, 5, restarts=1, seed=0, num_classes=3)
    cold = soft_kmeans(aux.images, centres, 1e-6, iters=5)
    np.testing.assert_allclose(cold, centres, atol=1e-4)  # near zero temperature: the k-means fixed point
    hot = soft_kmeans(aux.images, centres, 1e3, iters=5)
    np.testing.assert_allclose(hot, np.repeat(aux.images.mean(0, keepdims=True), 5, 0), atol=1e-4)
    far = np.concatenate([centres, np.ones((1, *SHAPE), np.float32)])  # a centre no image is near
    np.testing.assert_array_equal(soft_kmeans(aux.images, far, 1e-6, iters=2)[-1], far[-1])


GLOBAL_SPECS = [
    SolverSpec("nearest", "matching_train", per_class=4, num_classes=3, distinct=True, allocation="global",
               select=("greedy", "claim"), m=(2, 4), min_sep=(0.0, 0.005), folds=2, train_per_class=60),
    SolverSpec("nearest", "nearest", per_class=4, num_classes=3, allocation="global", m=(2, 4), folds=2),
    SolverSpec("coverage", "coverage", per_class=4, num_classes=3, allocation="global", restarts=2,
               temperature=(0.0, 0.01), folds=2),
]


@pytest.mark.parametrize("spec", GLOBAL_SPECS, ids=lambda s: f"{s.name}-{s.rule}")
def test_global_solvers_pick_on_pooled_folds_and_freeze(spec):
    aux = tight_and_spread()
    sol = solve(aux, spec)
    assert sol.images.shape == (12, *SHAPE) and len(sol.labels) == 12
    assert sol.images.min() >= 0 and sol.images.max() <= 1
    scores = sol.info["scores"]
    assert len(scores) > 1
    chosen = next(k for k, v in scores.items() if v == min(scores.values()))
    setting = str(sol.info["temperature"]) if spec.name == "coverage" else str(
        (sol.info["select"], sol.info["m"], sol.info["min_sep"]))
    assert chosen == setting
    np.testing.assert_array_equal(solve(aux, fixed(spec, sol.info)).images, sol.images)


def test_global_nearest_without_distinct_repeats_one_prototype():
    sol = solve(tight_and_spread(), GLOBAL_SPECS[1])
    assert len(np.unique(sol.images.reshape(12, -1), axis=0)) == 1
    assert set(sol.labels.tolist()) == {0}  # the densest point is in the tight class


@pytest.mark.parametrize("spec,match", [
    (SolverSpec("nearest", "nearest", allocation="sideways"), "solver.allocation='sideways'"),
    (SolverSpec("shrinkage", "matching", allocation="global"), "works with coverage and nearest"),
    (SolverSpec("nearest", "nearest", allocation="global", select=("bogus",)), "solver.select='bogus'"),
])
def test_global_solver_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        solve(tight_and_spread(), spec)


def test_metrics_survive_empty_and_single_image_classes():
    aux = tight_and_spread()
    images = aux.images[:5]
    labels = np.array([0, 0, 0, 1, 0])
    p = proxy_mse(images, labels, aux, num_classes=3)
    assert "proxy_mse_c2" not in p and np.isfinite(p["proxy_mse"])
    per_image = [pairwise_mse(images[i:i + 1], aux.of_class(labels[i])).min() for i in range(5)]
    assert p["proxy_mse"] == pytest.approx(np.mean(per_image))
    d = diversity(images, labels, num_classes=3)
    assert set(k for k in d if k.startswith("diversity_mean_pairwise_mse_c")) == {"diversity_mean_pairwise_mse_c0"}


def test_pooled_holdout_scores_all_images_against_the_whole_fold():
    aux = tight_and_spread()
    spec = SolverSpec("nearest", "matching_train", per_class=4, num_classes=3, distinct=True, allocation="global",
                      m=(3,), folds=2, train_per_class=60)

    def build(d):
        s = solve(d, spec)
        return s.images, s.labels

    got = holdout_scores(aux, build, per_class=4, folds=2, num_classes=3, train_per_class=60, pooled=True)
    assert set(got) == {f"holdout_{r}" for r in RULES}  # no per-class breakdown: class counts vary
    s = np.ones((2, *SHAPE), np.float32) * 0.5
    held = aux.images[:20]
    assert pooled_rule_score("coverage", s, held, 4, 3, 60) == class_rule_score("coverage", s, held, 12, 180)


def test_redrawn_target_scores():
    rng = np.random.default_rng(0)
    train = rng.random((6, *SHAPE)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    sub = rng.random((6, *SHAPE)).astype(np.float32)
    got = redrawn_target_scores(sub, train, labels, per_class=2, draws=5)
    # every draw takes both images of every class, so every draw is the whole train set
    assert got["matching"] == pytest.approx(score_matching(sub, train))
    assert got["coverage"] == pytest.approx(score_coverage(sub, train))
    one = redrawn_target_scores(sub, train, labels, per_class=1, draws=50, seed=3)
    assert one == redrawn_target_scores(sub, train, labels, per_class=1, draws=50, seed=3)
    singles = [score_coverage(sub, train[list(g)]) for g in itertools.product([0, 1], [2, 3], [4, 5])]
    assert min(singles) <= one["coverage"] <= max(singles)


def test_global_preset_runs_in_the_pipeline(compose_cfg):
    cfg = compose_cfg("experiment=best_matching_train", "solver.m=[3,5]", "solver.min_sep=[0.002]")
    summary = run(cfg)
    r = MlflowClient(cfg.tracking.uri).get_run(summary["run_id"])
    assert r.data.tags["solver_select"] in ("greedy", "claim")
    assert r.data.params["solver.allocation"] == "global" and r.data.params["solver.folds"] == "2"
    m = r.data.metrics
    assert "holdout_matching_train" in m and not any(k.startswith("holdout_matching_train_c") for k in m)
    assert m["score_matching_redrawn"] > 0 and m["score_coverage_redrawn"] > 0
    assert m["solver_m"] in (3.0, 5.0)


def test_logits_swap_accepts_an_image_alone_in_its_class(digits_replica):
    from recon.candidates import Candidates
    from recon.logits_client import ReplicaLogits
    from recon.refine import logits_swap

    aux = digits_replica.aux
    images = np.concatenate([aux.of_class(0)[:9], aux.of_class(1)[:1]])
    labels = np.array([0] * 9 + [1])
    def pool_for(c):
        pool = aux.of_class(c)[10:13]
        return Candidates(pool, np.full(3, c), np.zeros(3, np.int64), np.full(3, 5), np.full(3, "centroid"),
                          np.full(3, -1))

    out, info = logits_swap(images, labels, pool_for, ReplicaLogits(digits_replica), n_swap=10)
    assert info["n_swapped"] >= 1
    # the class-1 image is alone in its class (nothing to keep apart from), and is still swapped
    assert any(np.array_equal(out[-1], p) for p in pool_for(1).images)


@pytest.mark.parametrize("counts,size", [([10] * 10, (10, 10)), ([70, 10, 20] + [0] * 7, (4 + 1 + 1 + 7, 20))])
def test_image_grid_wraps_a_crowded_class(tmp_path, counts, size):
    from PIL import Image

    from recon.plots import image_grid

    labels = np.repeat(np.arange(10), counts)
    images = np.random.default_rng(0).random((len(labels), 3, 8, 8)).astype(np.float32)
    image_grid(images, labels, tmp_path / "grid.png")
    width, height = Image.open(tmp_path / "grid.png").size
    rows, cols = size
    assert (height, width) == (round(rows * 0.8 * 80), round(cols * 0.8 * 80))
