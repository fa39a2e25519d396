"""Sweeps, compare and replay through the real command line (subprocesses), against a temporary store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from recon import compare, replay
from recon.tracking import PARENT_TAG


def recon_cli(state, replica, *args):
    env = {**os.environ, "CI": "true"}
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    cmd = [sys.executable, "-m", "recon", *flags, f"paths.state={state}", f"challenge.dir={replica.root}",
           "proxy.folds=2", "pipeline.seeds=2", *(a for a in args if not a.startswith("-"))]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def runs_of(state):
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    exp = client.get_experiment_by_name("recon")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("recon.sweep") == "parent"]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return client, parents, children


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_four_job_sweep_one_parent_four_children(tmp_path, digits_replica, launcher):
    state = tmp_path / "state"
    res = recon_cli(state, digits_replica, "-m", "pipeline.k=5,10", "pipeline.medoid_ratio=0,1",
                    f"hydra/launcher={launcher}")
    assert res.returncode == 0, res.stderr[-3000:]
    client, parents, children = runs_of(state)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert all(c.data.tags[PARENT_TAG] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    # no cross-wiring: each child holds the knobs of a distinct grid point, and its own submission
    grid = {(c.data.params["pipeline.k"], c.data.params["pipeline.medoid_ratio"]) for c in children}
    assert grid == {("5", "0"), ("5", "1"), ("10", "0"), ("10", "1")}
    assert len({c.data.tags["submission_sha256"] for c in children}) == 4
    for c in children:
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"submission.npz", ".hydra"} <= arts
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.md", "sweep_heatmap.png"} <= arts
    table = open(client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp_path))).read()
    scores = [float(line.split(",")[4]) for line in table.splitlines()[1:]]
    assert table.splitlines()[0].startswith("run_id,status,pipeline.k,pipeline.medoid_ratio,submission_score")
    assert scores == sorted(scores) and len(scores) == 4


def test_sweep_with_a_failing_job(tmp_path, digits_replica):
    state = tmp_path / "state"
    res = recon_cli(state, digits_replica, "-m", "pipeline.k=5,500")
    assert res.returncode == 1
    assert "1 of 2 jobs failed" in res.stderr
    client, parents, children = runs_of(state)
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED", "FINISHED"]
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "traceback.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    tb = open(client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))).read()
    assert "pipeline.k=500 exceeds" in tb
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.md"} <= arts


def test_sweep_stops_before_any_job_when_the_store_cannot_be_set_up(tmp_path, digits_replica):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    res = recon_cli(tmp_path / "state", digits_replica, "-m", "pipeline.k=5,10",
                    f"tracking.uri=sqlite:///{blocker}/mlflow.db")
    assert res.returncode == 2
    assert "recon sweep: cannot set up the MLflow parent run" in res.stderr and "No job was run" in res.stderr
    assert "recon run" not in res.stdout  # no job started


def test_compare_prints_the_sweep_table(tmp_path, digits_replica, capsys):
    state = tmp_path / "state"
    assert recon_cli(state, digits_replica, "-m", "pipeline.medoid_ratio=0,1").returncode == 0
    _, parents, children = runs_of(state)
    assert compare.main(["--parent", parents[0].info.run_id, "--state", str(state)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "pipeline.medoid_ratio" in lines[0] and "submission_score" in lines[0]
    assert "pipeline.k" not in lines[0]  # only the knobs that differ
    assert len(lines) == 2 + len(children)
    assert compare.main(["--experiment", "recon", "--state", str(state), "--sort", "proxy_mse"]) == 0
    assert "proxy_mse" in capsys.readouterr().out
    assert compare.main(["--experiment", "nope", "--state", str(state)]) == 2


def test_replay_reproduces_the_submission(tmp_path, digits_replica, capsys):
    state = tmp_path / "state"
    res = recon_cli(state, digits_replica, "experiment=seed_v2")
    assert res.returncode == 0, res.stderr[-3000:]
    _, _, _ = runs_of(state)
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("recon").experiment_id])
    assert replay.main([run.info.run_id, "--state", str(state)]) == 0
    assert "byte-identical" in capsys.readouterr().out
    runs = client.search_runs([run.info.experiment_id])
    replayed = next(r for r in runs if r.data.tags.get("replay_of") == run.info.run_id)
    assert replayed.data.tags["submission_sha256"] == run.data.tags["submission_sha256"]
    assert replay.main(["0" * 32, "--state", str(state)]) == 2


def test_mlflow_ui_on_the_documented_store_shows_the_runs(tmp_path, compose_cfg):
    """README: `mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db` serves our runs and metrics."""
    import socket
    import time

    import requests

    from recon.pipeline import run

    state = tmp_path / "mlruns"
    summary = run(compose_cfg("proxy.folds=2", state=state))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                             f"sqlite:///{state}/mlflow.db", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        exp = requests.get(base + "/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": "recon"}, timeout=10).json()["experiment"]
        runs = requests.post(base + "/api/2.0/mlflow/runs/search",
                             json={"experiment_ids": [exp["experiment_id"]]}, timeout=10).json()["runs"]
        (r,) = runs
        assert r["info"]["run_id"] == summary["run_id"]
        keys = {m["key"] for m in r["data"]["metrics"]}
        assert {"submission_score", "holdout_matching", "proxy_mse", "diversity_mean_pairwise_mse"} <= keys
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
