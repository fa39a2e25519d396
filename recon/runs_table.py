"""Tables of MLflow runs: the knobs that differ between them, plus the key metrics."""

from __future__ import annotations

import math

import pandas as pd
from mlflow.entities import Run

from recon.scoring import RULES

KNOB_PREFIXES = ("pipeline.", "refine.", "proxy.", "seed", "challenge.build.", "name")
KEY_METRICS = (
    ["submission_score"] + [f"score_{r}" for r in RULES] + [f"holdout_{r}" for r in RULES]
    + ["proxy_mse", "diversity_mean_pairwise_mse", "diversity_min_pairwise_mse", "n_logits_queries"]
)


def runs_frame(runs: list[Run], sort: str = "submission_score") -> tuple[pd.DataFrame, list[str]]:
    """One row per run: id, status, the varying knobs, the key metrics; sorted with missing values last."""
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "status": r.info.status}
        row.update({k: v for k, v in r.data.params.items() if k.startswith(KNOB_PREFIXES)})
        row.update({m: r.data.metrics.get(m, math.nan) for m in KEY_METRICS})
        if sort not in KEY_METRICS:
            row[sort] = r.data.metrics.get(sort, math.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df, []
    knob_cols = [c for c in df.columns if c.startswith(KNOB_PREFIXES)]
    varying = [c for c in knob_cols if df[c].astype(str).nunique(dropna=False) > 1]
    metric_cols = [m for m in KEY_METRICS if m in df and df[m].notna().any()]
    if sort not in metric_cols and sort in df:
        metric_cols.insert(0, sort)
    df = df[["run_id", "status", *varying, *metric_cols]]
    if sort in df:
        df = df.sort_values(sort, na_position="last", kind="stable")
    return df.reset_index(drop=True), varying


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no runs)\n"

    def fmt(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"
