"""Hydra callback for multiruns: one MLflow parent per sweep, a summary table and heatmap at the end."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from recon.atomic import atomic_write_text
from recon.pipeline import PARENT_FILE
from recon.plots import heatmap
from recon.runs_table import runs_frame, to_markdown
from recon.tracking import PARENT_TAG, setup_store


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str):
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                               max_results=10000)


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._start_parent(config)
        except Exception as e:  # noqa: BLE001 -- Hydra would only warn and run every job against a broken store
            print(f"recon sweep: cannot set up the MLflow parent run at tracking.uri={config.tracking.uri}: "
                  f"{type(e).__name__}: {e}. No job was run.", file=sys.stderr, flush=True)
            raise SystemExit(2) from e

    def _start_parent(self, config: DictConfig) -> None:
        tr = config.tracking
        # Initialise the store once, here in the parent: parallel jobs would race on table creation.
        exp_id = setup_store(tr.uri, tr.experiment, tr.artifact_root)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tr.uri)
        run = client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags={
            "recon.sweep": "parent",
            "hydra_overrides": " ".join(config.hydra.overrides.task)[:5000],
            "sweep_dir": str(sweep_dir),
        })
        atomic_write_text(sweep_dir / PARENT_FILE, run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        tr = config.tracking
        sweep_dir = Path(config.hydra.sweep.dir)
        parent_id = (sweep_dir / PARENT_FILE).read_text().strip()
        client = MlflowClient(tr.uri)
        exp_id = client.get_run(parent_id).info.experiment_id
        runs = child_runs(client, exp_id, parent_id)
        failed = [r.info.run_id for r in runs if r.info.status != "FINISHED"]
        write_summary(client, parent_id, runs)
        client.log_metric(parent_id, "n_children", len(runs))
        client.log_metric(parent_id, "n_failed", len(failed))
        client.set_terminated(parent_id, "FINISHED" if not failed else "FAILED")
        print(f"recon sweep: parent run {parent_id}, {len(runs)} jobs, {len(failed)} failed; "
              f"summary logged as sweep_summary.md", flush=True)
        if failed:
            # Hydra turns callback exceptions into warnings; SystemExit is what gives the sweep a failing status.
            print(f"recon sweep: {len(failed)} of {len(runs)} jobs failed (runs {', '.join(failed)}); see their "
                  "traceback.txt artifacts. The sweep summary was written.", file=sys.stderr, flush=True)
            raise SystemExit(1)


def write_summary(client: MlflowClient, parent_id: str, runs) -> None:
    """CSV and markdown of every child, sorted by submission_score; a heatmap when two knobs varied."""
    df, varying = runs_frame(runs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        df.to_csv(tmp / "sweep_summary.csv", index=False)
        (tmp / "sweep_summary.md").write_text(to_markdown(df))
        if len(varying) == 2 and "submission_score" in df:
            rows, cols = sorted(df[varying[0]].unique(), key=_num), sorted(df[varying[1]].unique(), key=_num)
            grid = np.full((len(rows), len(cols)), np.nan)
            for _, r in df.iterrows():
                grid[rows.index(r[varying[0]]), cols.index(r[varying[1]])] = r["submission_score"]
            heatmap(grid, rows, cols, varying[0], varying[1], "submission_score (lower is better)",
                    tmp / "sweep_heatmap.png")
        for f in tmp.iterdir():
            client.log_artifact(parent_id, str(f))


def _num(v):
    try:
        return (0, float(v))
    except (TypeError, ValueError):
        return (1, str(v))
