"""Command-line tools around the API client: `recon-submit`, `recon-ledger`, `recon-probe`.

Each takes Hydra-style overrides of the app config for the server, e.g.
`recon-submit sub.npz challenge=replica_server challenge.base_url=http://127.0.0.1:8000`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from omegaconf.errors import MissingMandatoryValue

from recon.client import ApiError, client_from_cfg
from recon.conventions import CONVENTIONS, encode
from recon.dataset_io import DatasetError, load_dataset
from recon.ledger import BudgetExceeded, Ledger, ledger_dir
from recon.store import server_cfg
from recon.submission import SubmissionError, load_submission

OVERRIDES_HELP = "Hydra overrides for the server, e.g. challenge=replica_server challenge.base_url=URL"


def _run(prog: str, fn, args) -> int:
    try:
        return fn(args)
    except MissingMandatoryValue as e:
        print(f"{prog}: error: {e.full_key} is not set; pass {e.full_key}=... as an override", file=sys.stderr)
    except (ApiError, BudgetExceeded, SubmissionError, DatasetError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def submit_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recon-submit", description="Validate a submission locally, then submit it.")
    ap.add_argument("submission")
    ap.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    def go(args):
        cfg = server_cfg(args.overrides)
        load_submission(args.submission)  # the server's own checks, before spending a submission
        response = client_from_cfg(cfg.challenge).submit(args.submission)
        print(json.dumps(response, indent=2))
        return 0

    return _run("recon-submit", go, ap.parse_args(argv))


def ledger_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recon-ledger", description="List the paid calls and submissions so far.")
    ap.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ap.add_argument("--json", action="store_true")

    def go(args):
        ch = server_cfg(args.overrides).challenge
        ledger = Ledger(ledger_dir(ch.ledger_dir, ch.base_url, ch.task_id),
                        max_logits_calls=ch.max_logits_calls, max_submissions=ch.max_submissions)
        calls = ledger.calls()
        if args.json:
            print(json.dumps({"ledger": str(ledger.root), "calls": calls}, indent=2))
            return 0
        print(f"ledger {ledger.root}")
        print(f"{'started':29} {'kind':7} {'status':13} {'images':>6}  sha256        extra")
        for c in calls:
            extra = " ".join(f"{k}={c[k]}" for k in ("submission_id", "score", "error") if c.get(k) is not None)
            print(f"{c['started']:29} {c['kind']:7} {c['status']:13} {c.get('n_images', 0):>6}  "
                  f"{c['sha256'][:12]}  {extra}")
        for kind, knob in (("logits", "max_logits_calls"), ("submit", "max_submissions")):
            limit = ch[knob]
            print(f"spent {kind}: {ledger.spent(kind)}" + (f" of {limit}" if limit is not None else " (no budget set)"))
        probe = ledger.probe_result()
        if probe:
            print(f"probed input convention: {probe['best']} (agreement {probe['agreement']})")
        return 0

    return _run("recon-ledger", go, ap.parse_args(argv))


def probe_conventions(aux_images: np.ndarray, aux_labels: np.ndarray, client, per_convention: int = 25) -> dict:
    """One call of up to 100 images: the same aux images under each convention; top-1 agreement for each."""
    n = min(per_convention, len(aux_images), 100 // len(CONVENTIONS))
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(aux_images), n, replace=False))
    imgs, labels = aux_images[idx], aux_labels[idx]
    batch = np.concatenate([encode(imgs, c) for c in CONVENTIONS])
    saved, client.convention = client.convention, "raw"  # send the encodings exactly as built here
    try:
        logits = client.logits(batch)
    finally:
        client.convention = saved
    preds = logits.argmax(axis=1).reshape(len(CONVENTIONS), n)
    agreement = {c: float((preds[i] == labels).mean()) for i, c in enumerate(CONVENTIONS)}
    best = max(CONVENTIONS, key=lambda c: (agreement[c], c == "raw"))
    return {"agreement": agreement, "best": best, "n_images_per_convention": n}


def probe_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recon-probe", description="Spend one logits call to learn the input "
                                 "convention the classifier understands; store the best in the ledger.")
    ap.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    def go(args):
        cfg = server_cfg(args.overrides)
        aux = load_dataset(cfg.challenge.aux_path)
        client = client_from_cfg(cfg.challenge)
        result = probe_conventions(aux.images, aux.labels, client)
        client.ledger.store_probe(result)
        print(json.dumps({**result, "real_calls": client.n_queries, "ledger": str(client.ledger.root)}, indent=2))
        return 0

    return _run("recon-probe", go, ap.parse_args(argv))
