"""The pipeline driving the replica server over HTTP: resumable from the ledger, and the key never leaks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ReplicaServer
from mlflow.tracking import MlflowClient

KEY = "sk-live-SECRET-" + "91b2e7d4c0"


@pytest.fixture
def state(tmp_path, digits_replica):
    """A state root holding a copy of the replica, so the server's call log is searched for the key too."""
    s = tmp_path / "mlruns"
    shutil.copytree(digits_replica.root, s / "replicas" / "digits")
    return s


def recon(state, server, *overrides, check=True):
    env = {**os.environ, "CI": "true", "RECON_API_KEY": KEY}
    cmd = [sys.executable, "-m", "recon", f"paths.state={state}", "challenge=replica_server",
           f"challenge.base_url={server.url}", "proxy.folds=2", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def last_run(state):
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    exp = client.get_experiment_by_name("recon")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_logits_swap_against_rate_limited_server_then_zero_calls(state):
    server = ReplicaServer(state / "replicas" / "digits", KEY, "--logits-interval", "2").start()
    try:
        first = recon(state, server, "refine=logits_swap", "refine.pool_seeds=2", "challenge.submit=true")
        run1 = last_run(state)
        assert run1.data.metrics["n_logits_queries"] == 1 and "submission_score" in run1.data.metrics
        second = recon(state, server, "refine=logits_swap", "refine.pool_seeds=2")
        run2 = last_run(state)
        assert run2.data.metrics["n_logits_queries"] == 0 and run2.data.metrics["n_logits_cached"] == 1
        assert run2.data.tags["submission_sha256"] == run1.data.tags["submission_sha256"]
        assert len(server.accepted_calls("logits")) == 1
    finally:
        server.stop()
    # the key is nowhere: not in the state tree (store, artifacts, Hydra dirs, ledger, call log), nor the output
    leaks = [str(p) for p in state.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaks == []
    for res in (first, second):
        assert KEY not in res.stdout and KEY not in res.stderr
    params = run1.data.params
    assert params["challenge.api_key"] == "***REDACTED***"
    assert not any(KEY in v for v in [*params.values(), *run1.data.tags.values()])


def test_server_killed_mid_run_resumes_from_the_ledger(state):
    rep = state / "replicas" / "digits"
    server = ReplicaServer(rep, KEY, "--logits-interval", "1").start()
    overrides = ["refine=light_optimize", "refine.rounds=5", "proxy.enabled=false", "challenge.retries=1",
                 "challenge.rate_margin=0.2"]
    env = {**os.environ, "CI": "true", "RECON_API_KEY": KEY}
    cmd = [sys.executable, "-m", "recon", f"paths.state={state}", "challenge=replica_server",
           f"challenge.base_url={server.url}", *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(server.accepted_calls()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    server.stop(kill=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run should fail while the server is down"
    paid_before = len(server.accepted_calls())
    assert 2 <= paid_before < 6
    ledger_dirs = list((state / "ledger").iterdir())
    assert len(ledger_dirs) == 1
    stored = len(list((ledger_dirs[0] / "logits").iterdir()))
    assert stored == paid_before  # every answered call was persisted before the crash

    server = ReplicaServer(rep, KEY, "--logits-interval", "1", port=server.port).start()
    try:
        recon(state, server, *overrides)
    finally:
        server.stop()
    run = last_run(state)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_logits_cached"] == paid_before
    assert run.data.metrics["n_logits_queries"] == 6 - paid_before
    assert len(server.accepted_calls()) == 6  # no extra paid call: 6 queries in all, across both runs
    calls = [json.loads(x) for x in (ledger_dirs[0] / "events.jsonl").read_text().splitlines()]
    assert sum(1 for c in calls if c["status"] == "ok") == 6


def test_budget_from_config_stops_the_run_before_sending(state):
    server = ReplicaServer(state / "replicas" / "digits", KEY).start()
    try:
        res = recon(state, server, "refine=light_optimize", "refine.rounds=3", "proxy.enabled=false",
                    "challenge.max_logits_calls=2", check=False)
    finally:
        server.stop()
    assert res.returncode != 0
    assert "budget exhausted: 2 of 2 logits calls already spent" in res.stderr
    assert len(server.accepted_calls()) == 2
    assert last_run(state).info.status == "FAILED"
    assert Path(state / "ledger").is_dir()
