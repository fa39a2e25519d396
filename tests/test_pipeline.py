"""The pipeline end to end: presets, a full tracked run, determinism and the seed variants' definitions."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.cluster import KMeans

from recon.candidates import class_stream
from recon.config import CONF_DIR, REDACTED
from recon.pipeline import params_from_cfg, run
from recon.reconstruct import reconstruct
from recon.scoring import RULES, pairwise_mse
from recon.tracking import params_from

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
FAST = ["proxy.folds=2"]


def test_every_preset_composes(compose_cfg):
    assert {"seed_centroids", "seed_blend", "seed_ratio", "seed_v2", "seed_final"} <= set(PRESETS)
    for name in PRESETS:
        cfg = compose_cfg(f"experiment={name}")
        assert cfg.name == name
        params_from_cfg(cfg)  # every preset yields valid pipeline parameters


def test_presets_hold_the_recipes(compose_cfg):
    a = compose_cfg("experiment=seed_centroids").pipeline
    assert (a.k, a.seeds, a.medoid_ratio) == (10, 1, 0.0)
    c = compose_cfg("experiment=seed_blend").pipeline
    assert (c.k, c.seeds, c.medoid_ratio, c.ranking, c.medoid_kind) == (10, 1, None, "class_mean", "nearest")
    d = compose_cfg("experiment=seed_ratio").pipeline
    assert (d.medoid_ratio, d.ranking, d.dedup_threshold) == (0.5, "farthest", 5e-4)
    assert compose_cfg("experiment=seed_ratio", "pipeline.medoid_ratio=0.8").pipeline.medoid_ratio == 0.8
    v2 = compose_cfg("experiment=seed_v2").pipeline
    assert (v2.ranking, v2.dedup_threshold) == ("farthest", 1e-4) and v2.centroid_preference > 0
    f = compose_cfg("experiment=seed_final")
    assert f.refine.name == "logits_swap" and f.refine.n_swap == 20
    assert list(f.refine.pool_k) == [8, 10, 12, 15] and f.refine.pool_seeds == 200


def test_state_root_is_absolute_and_everything_lives_under_it(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    register = compose_cfg  # noqa: F841 - the fixture registers the resolver
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
    state = Path(cfg.paths.state)
    assert state == tmp_path / "mlruns" and state.is_absolute()
    assert cfg.tracking.uri == f"sqlite:///{state}/mlflow.db" and cfg.tracking.uri.startswith("sqlite:////")
    assert Path(cfg.challenge.dir).is_relative_to(state) and Path(cfg.paths.cache).is_relative_to(state)


def test_four_knobs_have_their_override_paths(compose_cfg):
    cfg = compose_cfg("pipeline.k=7", "pipeline.seeds=[3,5]", "pipeline.medoid_ratio=0.3",
                      "pipeline.dedup_threshold=0.001")
    p = params_from_cfg(cfg)
    assert (p.k, p.seeds, p.medoid_ratio, p.dedup_threshold) == ((7,), (3, 5), 0.3, 0.001)
    assert params_from_cfg(compose_cfg("pipeline.seeds=4")).seeds == (0, 1, 2, 3)


@pytest.fixture
def tracked_run(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "pipeline.seeds=2")
    summary = run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    return cfg, summary, client.get_run(summary["run_id"]), client


def test_full_run_logs_the_contract(tracked_run, digits_replica):
    cfg, summary, r, client = tracked_run
    assert r.info.status == "FINISHED"
    m = r.data.metrics
    names = ["proxy_mse", "diversity_mean_pairwise_mse", "diversity_min_pairwise_mse", "submission_score",
             "n_logits_queries", "n_logits_images"]
    names += [f"holdout_{x}" for x in RULES] + [f"score_{x}" for x in RULES]
    for name in names:
        assert name in m, name
    for base in ["proxy_mse", "diversity_mean_pairwise_mse", "diversity_min_pairwise_mse",
                 *[f"holdout_{x}" for x in RULES]]:
        per = [m[f"{base}_c{c}"] for c in range(10)]
        assert m[base] == pytest.approx(np.mean(per))
    for stage in ["load", "reconstruct", "refine", "submission", "holdout", "score"]:
        assert f"seconds_{stage}" in m
    assert m["submission_score"] == m["score_matching"] and m["n_logits_queries"] == 0
    # the logged score is the replica's own scorer on the submitted file
    with np.load(summary["submission"]) as z:
        assert digits_replica.score(z["images"]) == pytest.approx(m["submission_score"], abs=1e-9)
    p, tags = r.data.params, r.data.tags
    assert p["pipeline.k"] == "10" and p["paths.state"] == cfg.paths.state
    for tag in ["git_commit", "git_dirty", "hydra_overrides", "submission_sha256", "replica_id"]:
        assert tag in tags, tag
    assert tags["submission_sha256"] == summary["submission_sha256"]
    assert tags["replica_id"] == digits_replica.id
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"submission.npz", "submission_grid.png", "config_resolved.yaml"} <= arts
    assert Path(cfg.tracking.artifact_root) in Path(r.info.artifact_uri.removeprefix("file://")).parents


def test_same_config_same_bytes(compose_cfg, tmp_path):
    a = run(compose_cfg("proxy.enabled=false", state=tmp_path / "s1"))
    b = run(compose_cfg("proxy.enabled=false", state=tmp_path / "s2"))
    assert a["submission_sha256"] == b["submission_sha256"]
    assert Path(a["submission"]).read_bytes() == Path(b["submission"]).read_bytes()
    c = run(compose_cfg("proxy.enabled=false", "seed=1", state=tmp_path / "s3"))
    assert c["submission_sha256"] != a["submission_sha256"]


def test_failed_run_is_marked_failed_with_traceback(compose_cfg):
    cfg = compose_cfg("pipeline.k=500")
    with pytest.raises(ValueError, match="pipeline.k=500 exceeds"):
        run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FAILED"
    assert "traceback.txt" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert mlflow.active_run() is None


def test_secrets_are_redacted_from_params():
    params = params_from({"challenge": {"api_key": "sk-123", "base_url": "http://x"}, "tracking": {"token": "t"}})
    assert params["challenge.api_key"] == REDACTED and params["tracking.token"] == REDACTED
    assert params["challenge.base_url"] == "http://x"
    assert "sk-123" not in str(params)
    long = params_from({"x": "a" * 9000, "bad key!": 1})
    assert len(long["x"]) == 6000 and "bad key_" in long


# --- the seed variants reproduce their definitions (CHALLENGE.md) -----------------------------------


def kmeans_ref(x, k, rs):
    km = KMeans(n_clusters=k, n_init=1, random_state=rs).fit(x.reshape(len(x), -1))
    cents = np.clip(km.cluster_centers_.reshape((k, *x.shape[1:])), 0, 1).astype(np.float32)
    nearest = []
    for j in range(k):  # reference: a plain loop over clusters
        members = np.flatnonzero(km.labels_ == j)
        d = ((x[members].reshape(len(members), -1) - km.cluster_centers_[j]) ** 2).sum(1)
        nearest.append(x[members[np.argmin(d)]])
    return cents, np.stack(nearest)


def test_seed_centroids_submits_the_ten_centroids(compose_cfg, digits_replica):
    rec = reconstruct(digits_replica.aux, params_from_cfg(compose_cfg("experiment=seed_centroids")), progress=False)
    for c in range(10):
        cents, _ = kmeans_ref(digits_replica.aux.of_class(c), 10, class_stream(0, 0, c))
        got = rec.images[rec.labels == c]
        np.testing.assert_allclose(np.sort(got.reshape(10, -1), 0), np.sort(cents.reshape(10, -1), 0), atol=1e-6)
        assert set(rec.chosen.kind[rec.labels == c]) == {"centroid"}


def test_seed_blend_keeps_the_ten_nearest_the_class_mean(compose_cfg, digits_replica):
    rec = reconstruct(digits_replica.aux, params_from_cfg(compose_cfg("experiment=seed_blend")), progress=False)
    for c in range(10):
        x = digits_replica.aux.of_class(c)
        cents, nearest = kmeans_ref(x, 10, class_stream(0, 0, c))
        pool = np.concatenate([cents, nearest])
        d = ((pool - x.mean(0)) ** 2).reshape(20, -1).mean(1)
        want = pool[np.argsort(d, kind="stable")[:10]]
        got = rec.images[rec.labels == c]
        assert pairwise_mse(got, want).min(axis=1).max() < 1e-10  # every pick is one of the 10 nearest
        assert pairwise_mse(want, got).min(axis=1).max() < 1e-10


@pytest.mark.parametrize("ratio,n_medoids", [(0.5, 5), (0.6, 6), (0.8, 8)])
def test_seed_ratio_fixed_mix_without_near_duplicates(compose_cfg, digits_replica, ratio, n_medoids):
    cfg = compose_cfg("experiment=seed_ratio", f"pipeline.medoid_ratio={ratio}")
    rec = reconstruct(digits_replica.aux, params_from_cfg(cfg), progress=False)
    for c in range(10):
        kinds = rec.chosen.kind[rec.labels == c]
        assert (kinds == "nearest").sum() == n_medoids and (kinds == "centroid").sum() == 10 - n_medoids
        x = rec.images[rec.labels == c]
        d = pairwise_mse(x, x) + np.eye(10)
        assert d.min() >= 5e-4


def test_seed_v2_farthest_point_without_near_duplicates(compose_cfg, digits_replica):
    rec = reconstruct(digits_replica.aux, params_from_cfg(compose_cfg("experiment=seed_v2")), progress=False)
    for c in range(10):
        x = rec.images[rec.labels == c]
        assert len(x) == 10 and (pairwise_mse(x, x) + np.eye(10)).min() >= 1e-4


def test_seed_final_is_blend_plus_one_logits_call(compose_cfg, tmp_path):
    blend = run(compose_cfg("experiment=seed_blend", "proxy.enabled=false", state=tmp_path / "b"))
    final = run(compose_cfg("experiment=seed_final", "proxy.enabled=false", "refine.pool_seeds=3",
                            state=tmp_path / "f"))
    assert final["metrics"]["n_logits_queries"] == 1 and final["metrics"]["n_logits_images"] == 100
    with np.load(blend["submission"]) as zb, np.load(final["submission"]) as zf:
        changed = (zb["images"] != zf["images"]).reshape(100, -1).any(axis=1)
    assert 0 < changed.sum() <= 20
    assert final["metrics"]["refine_n_swapped"] == changed.sum()
