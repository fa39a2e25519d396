"""`recon-compare`: the runs of a sweep or an experiment side by side (the knobs that differ + key metrics)."""

from __future__ import annotations

import argparse
import sys

from mlflow.tracking import MlflowClient

from recon.runs_table import runs_frame, to_markdown
from recon.store import add_store_args, store_from_args
from recon.sweep import child_runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recon-compare", description=__doc__)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--parent", help="a sweep's parent run id: compare its children")
    g.add_argument("--experiment", help="compare every run of this experiment (default: the configured one)")
    ap.add_argument("--sort", default="submission_score", help="metric to sort by (ascending)")
    ap.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    add_store_args(ap)
    args = ap.parse_args(argv)
    uri, default_exp = store_from_args(args)
    client = MlflowClient(uri)
    if args.parent:
        try:
            parent = client.get_run(args.parent)
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for an unknown id
            print(f"recon-compare: no run {args.parent} in {uri}: {e}", file=sys.stderr)
            return 2
        runs = child_runs(client, parent.info.experiment_id, args.parent)
    else:
        name = args.experiment or default_exp
        exp = client.get_experiment_by_name(name)
        if exp is None:
            print(f"recon-compare: no experiment {name!r} in {uri}", file=sys.stderr)
            return 2
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=10000)
                if r.data.tags.get("recon.sweep") != "parent"]
    df, _ = runs_frame(runs, sort=args.sort)
    print(df.to_csv(index=False) if args.csv else to_markdown(df), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
