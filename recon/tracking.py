"""MLflow at the edge: the store, one run's params/tags/metrics/artifacts, and FAILED runs with tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from recon.config import flatten, redact

MAX_PARAM_CHARS = 6000
PARENT_TAG = "mlflow.parentRunId"


def _sanitise_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)[:250]


def params_from(container: dict) -> dict[str, str]:
    """Flattened, sanitised, secrets redacted, values cut to MLflow's 6000 characters."""
    return {_sanitise_key(k): str(v)[:MAX_PARAM_CHARS] for k, v in flatten(redact(container)).items()}


def setup_store(uri: str, experiment: str, artifact_root: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    Called once by the sweep parent before jobs start, so parallel jobs never race on table creation."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    Path(artifact_root).mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(experiment, artifact_location=Path(artifact_root, experiment).as_uri())
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(experiment).experiment_id


def git_state() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


@contextmanager
def tracked_run(
    uri: str, experiment: str, artifact_root: str, *, run_name: str, parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, or FAILED with the traceback logged as an artifact."""
    exp_id = setup_store(uri, experiment, artifact_root)
    all_tags = {**git_state(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except BaseException:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "traceback.txt")
            with open(path, "w") as fh:
                fh.write(traceback.format_exc())
            mlflow.log_artifact(path)
        raise
    finally:  # joblib reuses workers: a run left open would swallow the next job's logging
        mlflow.end_run(status=status)
