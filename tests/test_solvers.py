"""Objective-aware solvers: their building blocks, the held-out tuning, the pipeline wiring and the bench."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy.optimize import linear_sum_assignment

from recon import bench
from recon.dataset_io import Dataset
from recon.metrics import class_rule_score, expected_nearest, extrapolated_nearest
from recon.pipeline import fit_source, run, spec_from_cfg
from recon.scoring import RULES, pairwise_mse, score_matching
from recon.solvers import (
    SolverSpec,
    dense_prototypes,
    fixed,
    kmeans_centroids,
    local_means,
    matching_quantiser,
    shrink,
    solve,
    tune,
)
from recon.submission import write_submission

SHAPE = (3, 4, 4)


def blobs(n_clusters=5, per=20, spread=0.05, seed=0, sizes=None):
    """Well-separated Gaussian clusters in [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.8, (n_clusters, *SHAPE))
    sizes = sizes or [per] * n_clusters
    x = np.concatenate([c + spread * rng.standard_normal((k, *SHAPE)) for c, k in zip(centres, sizes)])
    return np.clip(x, 0, 1).astype(np.float32), centres


def dataset(per_class=30, classes=10, seed=0, spread=0.08):
    rng = np.random.default_rng(seed)
    parts, labels = [], []
    for c in range(classes):
        x, _ = blobs(3, per_class // 3, spread, seed=seed * 100 + c)
        parts.append(x)
        labels.append(np.full(len(x), c))
    perm = rng.permutation(sum(len(p) for p in parts))
    return Dataset(np.concatenate(parts)[perm], np.concatenate(labels)[perm].astype(np.int64))


def expected_matching_cost(s, x, draws=300, seed=1):
    rng = np.random.default_rng(seed)
    return np.mean([score_matching(s, x[rng.choice(len(x), len(s), replace=False)]) for _ in range(draws)])


def test_shrink_endpoints():
    x, _ = blobs()
    imgs = x[:4]
    np.testing.assert_allclose(shrink(imgs, x, 0.0), imgs, atol=1e-7)
    np.testing.assert_allclose(shrink(imgs, x, 1.0), np.repeat(x.mean(0, keepdims=True), 4, 0), atol=1e-6)


def test_matching_quantiser_lowers_expected_matching_cost_and_is_deterministic():
    x, _ = blobs(5, sizes=[40, 25, 15, 10, 10], spread=0.1)
    init = kmeans_centroids(x, 5, 0)
    mq = matching_quantiser(x, 5, iters=15, draws=80, seed=0, init=init)
    assert mq.shape == (5, *SHAPE) and mq.dtype == np.float32
    assert expected_matching_cost(mq, x) < expected_matching_cost(init, x)
    np.testing.assert_array_equal(mq, matching_quantiser(x, 5, iters=15, draws=80, seed=0, init=init))


def test_matching_quantiser_recovers_equal_mass_clusters():
    x, centres = blobs(5, per=30, spread=0.02)
    mq = matching_quantiser(x, 5, iters=10, draws=50, seed=0)
    d = pairwise_mse(mq, centres)
    nearest = d.argmin(axis=1)
    assert sorted(nearest) == list(range(5))  # one centre per cluster
    # each sits near its cluster (random draws rarely hold one image per cluster, so not exactly on the mean)
    between = pairwise_mse(centres, centres) + np.eye(5)
    assert d.min(axis=1).max() < 0.25 * between.min()


def test_local_means_and_dense_prototypes():
    dense, _ = blobs(1, per=30, spread=0.01, seed=1)
    sparse, _ = blobs(1, per=10, spread=0.2, seed=2)
    x = np.concatenate([dense, sparse])
    means, density = local_means(x, 5)
    assert means.shape == x.shape and np.argmin(density) < 30  # the densest point is in the tight blob
    dup = dense_prototypes(x, 4, 5, distinct=False)
    assert (dup == dup[0]).all()
    apart = dense_prototypes(x, 4, 3, distinct=True, min_sep=1e-3)
    d = pairwise_mse(apart, apart) + np.eye(4)
    assert len(apart) == 4 and d.min() > 0


def test_expected_nearest_is_exact():
    import itertools

    d = np.random.default_rng(0).random((3, 7))
    for n in (1, 2, 3, 7):
        brute = np.array([[min(row[list(c)]) for c in itertools.combinations(range(7), n)] for row in d]).mean(1)
        np.testing.assert_allclose(expected_nearest(d, n), brute, atol=1e-12)


def test_expected_nearest_on_a_large_fold_stays_finite():
    """C(3000, 1500) overflows a float: the weights are computed in logs."""
    d = np.random.default_rng(0).random((2, 3000))
    e = expected_nearest(d, 1500)
    assert np.isfinite(e).all() and (d.min(axis=1) <= e).all() and (e < np.sort(d, axis=1)[:, 2]).all()
    np.testing.assert_allclose(expected_nearest(d, 3000), d.min(axis=1))  # the whole fold: its minimum


def test_nearest_extrapolation_favours_points_that_get_closer_with_more_images():
    rng = np.random.default_rng(0)
    held = rng.random((40, *SHAPE)).astype(np.float32)
    sharp, blurry = held[:1] + 0.01, np.full((1, *SHAPE), 0.5, np.float32)
    d = pairwise_mse(np.concatenate([sharp, blurry]), held[1:])
    fold = extrapolated_nearest(d, None)
    big = extrapolated_nearest(d, 5000)
    assert (big <= fold + 1e-12).all()  # more images can only bring the nearest closer
    assert big[0] / fold[0] < big[1] / fold[1]  # the random-looking point gains more than the mean image


def test_matching_train_size_correction():
    rng = np.random.default_rng(0)
    s, t = rng.random((6, *SHAPE)), rng.random((4, *SHAPE))
    d = pairwise_mse(s, t)
    one_to_one = d[linear_sum_assignment(d)].mean()
    assert class_rule_score("matching_train", s, t, 10) == pytest.approx(one_to_one)
    # |T| per class as large as the fold: no correction
    assert class_rule_score("matching_train", s, t, 10, train_per_class=4) == pytest.approx(one_to_one)
    # a huge T: chunks of one, so the extrapolated nearest distance
    assert class_rule_score("matching_train", s, t, 10, train_per_class=1000) == pytest.approx(
        class_rule_score("nearest", s, t, 10, train_per_class=1000))
    # in between: chunks of 2 (6 * 4 / 12), each matched one-to-one, scaled by the extrapolation
    chunks = np.mean([d[i:i + 2][linear_sum_assignment(d[i:i + 2])] for i in (0, 2, 4)])
    scale = extrapolated_nearest(d, 12).mean() / d.min(1).mean()
    assert class_rule_score("matching_train", s, t, 10, train_per_class=12) == pytest.approx(chunks * scale)


def test_tune_picks_the_lowest_held_out_score():
    aux = dataset(spread=0.15)
    grid = [0.0, 0.3, 0.6, 1.0]

    def base(x, c):
        return kmeans_centroids(x, 10, c)

    best, scores = tune(aux, base, lambda b, x, a: shrink(b, x, a), grid, rule="matching", per_class=10,
                        folds=3, seed=0)
    assert set(scores) == {str(v) for v in grid}
    assert scores[str(best)] == min(scores.values())
    assert tune(aux, base, lambda b, x, a: b, [0.5], rule="matching", per_class=10, folds=3, seed=0)[0] == 0.5


@pytest.mark.parametrize("spec", [
    SolverSpec("shrinkage", "matching", alpha=(0.0, 0.3), folds=2),
    SolverSpec("matching_quantiser", "matching", alpha=(0.0, 0.1), iters=3, draws=20, folds=2),
    SolverSpec("coverage", "coverage", restarts=2, alpha=(0.0, 0.1), folds=2),
    SolverSpec("nearest", "nearest", m=(1, 3), folds=2),
    SolverSpec("nearest", "matching_train", m=(1, 3), distinct=True, min_sep=(0.0, 1e-3), folds=2,
               train_per_class=40),
])
def test_every_solver_returns_a_submission_and_freezes_its_settings(spec):
    aux = dataset()
    sol = solve(aux, spec)
    assert sol.images.shape == (100, *SHAPE) and np.bincount(sol.labels).tolist() == [10] * 10
    assert sol.images.min() >= 0 and sol.images.max() <= 1
    frozen = fixed(spec, sol.info)
    again = solve(aux, frozen)
    np.testing.assert_array_equal(again.images, sol.images)  # the frozen settings reproduce the fit


def test_unknown_solver():
    with pytest.raises(ValueError, match="solver='bogus'"):
        solve(dataset(), SolverSpec("bogus", "matching"))


@pytest.mark.parametrize("rule", RULES)
def test_best_presets_log_their_objective(compose_cfg, rule):
    cfg = compose_cfg(f"experiment=best_{rule}", "proxy.folds=2", "solver.fit_on=aux")
    summary = run(cfg)
    r = MlflowClient(cfg.tracking.uri).get_run(summary["run_id"])
    assert r.data.tags["objective_rule"] == rule and r.data.params["objective.rule"] == rule
    assert r.data.tags["solver"] == cfg.solver.name != "seed"
    assert f"holdout_{rule}" in r.data.metrics and "oracle" not in r.data.tags
    assert "fit_on" not in r.data.tags


def test_objective_defaults_to_the_replica_rule_and_oracle_is_marked(compose_cfg, digits_replica):
    cfg = compose_cfg("solver=nearest", "solver.m=[3]", "proxy.enabled=false", "solver.fit_on=train")
    summary = run(cfg)
    r = MlflowClient(cfg.tracking.uri).get_run(summary["run_id"])
    assert r.data.tags["objective_rule"] == digits_replica.rule
    assert r.data.tags["oracle"] == "true" and r.data.tags["fit_on"] == "train"
    # fitted on the hidden train set: every prototype is a local mean of train images
    assert summary["metrics"]["score_nearest"] < run(compose_cfg("solver=nearest", "solver.m=[3]",
                                                                 "proxy.enabled=false"))["metrics"]["score_nearest"]


def test_bench_writes_the_comparison_table(tmp_path, digits_replica, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SEED_VARIANTS", {k: v for k, v in bench.SEED_VARIANTS.items() if k[0] in "AC"})
    monkeypatch.setattr(bench, "ORACLES", {"oracle_nearest": ["experiment=best_nearest", "solver.fit_on=train"]})
    monkeypatch.setattr(bench, "MORE_DATA", {"more_data_matching": bench.MORE_DATA["more_data_matching"]})
    out = tmp_path / "bench.md"
    assert bench.main(["--replica", str(digits_replica.root), "--state", str(tmp_path / "s"),
                       "--out", str(out)]) == 0
    text = out.read_text()
    for r in RULES:
        assert f"| `{r}` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `nearest` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    seed_score, ours, oracle = float(cells[2]), float(cells[3]), float(cells[5])
    assert float(cells[4].split()[0]) == pytest.approx(ours / seed_score, abs=5e-3)  # cells are rounded
    assert int(cells[6].rstrip("%")) == pytest.approx(100 * (seed_score - ours) / (seed_score - oracle), abs=1.5)
    assert cells[7].startswith("n/a")  # nearest is scored on all of T: no target set to redraw
    matching = [c.strip() for c in next(line for line in text.splitlines()
                                        if line.startswith("| `matching` |")).strip("|").split("|")]
    assert 0 < float(matching[7]) < 2  # the ratio over redrawn target sets
    more = next(line for line in text.splitlines() if line.startswith("| more_data_matching |"))
    more_cells = [c.strip() for c in more.strip("|").split("|")]
    more_score = float(more_cells[2])
    # nearest, matching_train and the redrawn target sets are all drawn from the T it has seen
    assert more_cells[1] == more_cells[3] == more_cells[5] == more_cells[6] == "in-sample"
    assert float(matching[8]) == pytest.approx(more_score / float(matching[2]), abs=5e-3)
    assert cells[8] == "n/a"  # no more-data reference for a rule scored on all of T
    client = MlflowClient(f"sqlite:///{tmp_path / 's'}/mlflow.db")
    exp = client.get_experiment_by_name("recon")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("recon.bench") == "bench")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 + len(bench.SOLVERS) + 2
    assert "bench.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_holdout_repeats_average_several_splits():
    from recon.metrics import holdout_scores

    aux = dataset()

    def build(d):
        sol = solve(d, SolverSpec("shrinkage", "matching", alpha=(0.2,), folds=2))
        return sol.images, sol.labels

    one = holdout_scores(aux, build, folds=2, seed=0)
    other = holdout_scores(aux, build, folds=2, seed=1)
    both = holdout_scores(aux, build, folds=2, seed=0, repeats=2)
    for r in RULES:
        assert both[f"holdout_{r}"] == pytest.approx((one[f"holdout_{r}"] + other[f"holdout_{r}"]) / 2)


def test_more_data_fits_on_aux_plus_the_unscored_train_images(compose_cfg, digits_replica):
    rest = digits_replica.train_without_targets()
    assert len(rest) == len(digits_replica.train) - len(digits_replica.targets)
    assert pairwise_mse(rest.images, digits_replica.targets.images).min() > 0  # no target inside
    source = fit_source("more_data", digits_replica.aux, digits_replica, "matching")
    assert len(source) == len(digits_replica.aux) + len(rest)
    cfg = compose_cfg("experiment=best_matching", "solver.iters=2", "solver.draws=10", "solver.alpha=[0.0]",
                      "proxy.enabled=false", "solver.fit_on=more_data")
    summary = run(cfg)
    r = MlflowClient(cfg.tracking.uri).get_run(summary["run_id"])
    assert r.data.tags["fit_on"] == "more_data" and "oracle" not in r.data.tags
    spec = spec_from_cfg(cfg, "matching", len(digits_replica.train) // 10)
    expected = solve(source, spec).images
    np.testing.assert_array_equal(np.load(summary["submission"])["images"], expected)


@pytest.mark.parametrize("overrides, match", [
    (["solver=nearest", "solver.fit_on=more_data", "objective.rule=nearest"], "scored on all of T"),
    (["solver=nearest", "solver.fit_on=everything"], "solver.fit_on='everything'"),
    (["solver=seed", "solver.fit_on=train"], "seed recipes always fit on aux"),
])
def test_fit_on_errors(compose_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        run(compose_cfg(*overrides, "proxy.enabled=false"))


def test_fresh_draws_of_all_of_t_rank_exactly(tmp_path, digits_replica):
    """Drawing every hidden image of each class leaves nothing to extrapolate: the ceiling is then exact."""
    rep = digits_replica
    results = {}
    for i in range(5):
        images = rep.aux.images[np.random.default_rng(i).choice(len(rep.aux), 100, replace=False)]
        if i == 4:
            images = np.repeat(images[:1], 100, axis=0)  # one image repeated: cheap under nearest, not matching_train
        path = write_submission(tmp_path / f"s{i}.npz", images, images.shape)
        results[f"s{i}"] = {**{f"score_{r}": v for r, v in rep.score_all(images).items()}, "submission": str(path)}
    everything = int(np.bincount(rep.train.labels).max())
    rho = bench.fresh_draw_rho(results, rep, [everything, 5], draws=2)
    assert rho[("nearest", everything)] == pytest.approx(1.0)
    assert rho[("matching_train", everything)] == pytest.approx(1.0)
    assert set(rho) == {(r, n) for r in bench.FRESH_RULES for n in (everything, 5)}


def test_proxy_check_reports_spearman_and_the_ceiling(tmp_path, digits_replica, monkeypatch):
    monkeypatch.setattr(bench, "PROXY_CHECK", {k: bench.PROXY_CHECK[k] for k in
                                               ("seed k=5 ratio=0", "seed k=20 ratio=1", "nearest m=5",
                                                "shrinkage alpha=0.4")})
    out = tmp_path / "proxy.md"
    assert bench.main(["--proxy-check", "--replica", str(digits_replica.root), "--state", str(tmp_path / "s"),
                       "--out", str(out), "proxy.folds=2"]) == 0
    lines = out.read_text().splitlines()
    for r in RULES:
        row = next(line for line in lines if line.startswith(f"| `{r}` | ") and "(" in line)
        rho = float(row.split("|")[2])
        assert -1.0 <= rho <= 1.0 and ("met" if rho >= 0.9 else "missed") in row
    assert "a fold holds 50 images per class" in out.read_text()
    assert "| rule | 50 per class |" in lines  # digits has 79-80 hidden images per class: 100 is not drawable
    for r in bench.FRESH_RULES:
        cells = next(line for line in lines if line.startswith(f"| `{r}` | ") and "(" not in line).split("|")
        assert -1.0 <= float(cells[2]) <= 1.0
