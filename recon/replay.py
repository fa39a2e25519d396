"""`recon-replay RUN_ID`: re-run a run from the `.hydra/` config it saved in MLflow; check the sha256."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from recon.store import add_store_args, store_from_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recon-replay", description=__doc__)
    ap.add_argument("run_id")
    add_store_args(ap)
    args = ap.parse_args(argv)
    uri, _ = store_from_args(args)
    client = MlflowClient(uri)
    try:
        run = client.get_run(args.run_id)
    except Exception as e:  # noqa: BLE001
        print(f"recon-replay: no run {args.run_id} in {uri}: {e}", file=sys.stderr)
        return 2
    old_sha = run.data.tags.get("submission_sha256")
    state = run.data.params.get("paths.state")
    if not old_sha or not state:
        print(f"recon-replay: run {args.run_id} has no submission_sha256 tag or paths.state param", file=sys.stderr)
        return 2
    dest = Path(state) / "replays" / args.run_id / time.strftime("%Y-%m-%d_%H-%M-%S")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        client.download_artifacts(args.run_id, ".hydra", str(dest))
    except Exception as e:  # noqa: BLE001
        print(f"recon-replay: run {args.run_id} saved no .hydra/ config ({e})", file=sys.stderr)
        return 2
    config_dir = (dest / ".hydra").resolve()
    run_dir = dest / "run"
    # --config-path, not --config-dir: the latter silently loads the app's own config.yaml instead.
    cmd = [sys.executable, "-m", "recon", "--config-path", str(config_dir), "--config-name", "config",
           f"paths.state={state}", f"hydra.run.dir={run_dir}", f"++tracking.tags.replay_of={args.run_id}"]
    print("recon-replay: " + " ".join(cmd[1:]), flush=True)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        print(f"recon-replay: the replayed run failed (exit {res.returncode})", file=sys.stderr)
        return res.returncode
    new = json.loads((run_dir / "summary.json").read_text())
    same = new["submission_sha256"] == old_sha
    print(json.dumps({"run_id": args.run_id, "replay_run_id": new["run_id"], "old_sha256": old_sha,
                      "new_sha256": new["submission_sha256"], "identical": same}, indent=2))
    print("recon-replay: submission is byte-identical" if same else "recon-replay: submission DIFFERS")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
