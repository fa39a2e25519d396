"""`recon-challenge`: build, score and serve an offline replica of the challenge."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recon.dataset_io import DatasetError, load_dataset
from recon.replica import DEFAULT_TASK_ID, ReplicaError, build_replica, load_replica
from recon.scoring import RULES
from recon.submission import SubmissionError, load_submission


def _build(args: argparse.Namespace) -> int:
    aux = train = pool = None
    pool_name = args.pool
    if args.aux or args.train:
        if not (args.aux and args.train):
            raise ReplicaError("--aux and --train go together")
        aux = load_dataset(args.aux, convert_uint8=args.convert_uint8)
        train = load_dataset(args.train, convert_uint8=args.convert_uint8)
    else:
        from recon.builtin_data import load_pool

        kwargs: dict = {}
        if args.pool == "synthetic":
            kwargs = {"n_per_class": args.synthetic_per_class, "seed": args.seed}
        elif args.pool == "cifar10":
            if not args.cifar_root:
                raise ReplicaError("--pool cifar10 needs --cifar-root DIR (the cifar-10-batches-py directory)")
            kwargs = {"root": args.cifar_root, "split": "all"}
        pool = load_pool(args.pool, **kwargs)
    t0 = time.perf_counter()
    rep = build_replica(
        args.out, aux=aux, train=train, pool=pool, pool_name=pool_name,
        aux_per_class=args.aux_per_class, train_per_class=args.train_per_class,
        targets_per_class=args.targets_per_class, seed=args.seed, rule=args.rule,
        task_id=args.task_id, epochs=args.epochs,
    )
    summary = {
        "replica": str(Path(args.out).resolve()),
        "replica_id": rep.id,
        "sizes": rep.meta["sizes"],
        "rule": rep.rule,
        "classifier": rep.meta["classifier"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    rep = load_replica(args.replica)
    images = load_submission(args.submission, rep.targets.images.shape)
    if args.all_rules:
        out = {"replica_id": rep.id, "rule": rep.rule, "scores": rep.score_all(images)}
    else:
        rule = args.rule or rep.rule
        out = {"replica_id": rep.id, "rule": rule, "score": rep.score(images, rule)}
    print(json.dumps(out, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from recon.server import run_server

    run_server(
        args.replica, host=args.host, port=args.port, keys_file=args.keys_file,
        logits_interval=args.logits_interval, submit_interval=args.submit_interval,
        input_convention=args.input_convention, faults=args.fault, fault_delay=args.fault_delay,
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recon-challenge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a replica directory")
    b.add_argument("--out", default="mlruns/replicas/digits", help="replica directory to write")
    b.add_argument("--aux", help="explicit auxiliary set (.pt/.npz, competition format)")
    b.add_argument("--train", help="explicit hidden train set (.pt/.npz, competition format)")
    b.add_argument("--convert-uint8", action="store_true", help="accept uint8 0-255 images and scale them")
    b.add_argument("--pool", default="digits", choices=["digits", "synthetic", "cifar10"])
    b.add_argument("--synthetic-per-class", type=int, default=600, help="pool size per class for --pool synthetic")
    b.add_argument("--cifar-root", help="cifar-10-batches-py directory for --pool cifar10")
    b.add_argument("--aux-per-class", type=int, default=100)
    b.add_argument("--train-per-class", type=int, default=None, help="default: all that is left")
    b.add_argument("--targets-per-class", type=int, default=10)
    b.add_argument("--rule", default="matching", choices=RULES)
    b.add_argument("--task-id", default=DEFAULT_TASK_ID)
    b.add_argument("--epochs", type=int, default=12)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_build)

    s = sub.add_parser("score", help="score a submission .npz against a replica")
    s.add_argument("replica")
    s.add_argument("submission")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--rule", choices=RULES, help="override the replica's rule")
    g.add_argument("--all-rules", action="store_true")
    s.set_defaults(fn=_score)

    from recon.conventions import CONVENTIONS  # imported here: only the serve block needs it

    v = sub.add_parser("serve", help="serve the competition's HTTP API for a replica")
    v.add_argument("replica")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--keys-file", help="file of API keys, one per line (default: $RECON_API_KEY)")
    v.add_argument("--logits-interval", type=float, default=0.0, help="seconds between logits calls per key; 0=off")
    v.add_argument("--submit-interval", type=float, default=0.0, help="seconds between submissions per key; 0=off")
    v.add_argument(
        "--input-convention", default="raw", choices=CONVENTIONS,
        help="how the model reads logits inputs: it gets decode(received, C) (see recon.conventions); default raw",
    )
    v.add_argument(
        "--fault", action="append", default=[], metavar="KIND:N",
        help="TEST ONLY: the first N authenticated logits calls get fault KIND (error503, error500, slow, "
        "malformed, wrong_count); repeat to chain faults in order, e.g. --fault error503:2 --fault malformed:1",
    )
    v.add_argument(
        "--fault-delay", type=float, default=3.0, metavar="SECONDS",
        help="TEST ONLY: how long a 'slow' fault waits before answering (default 3)",
    )
    v.set_defaults(fn=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (DatasetError, ReplicaError, SubmissionError, ValueError) as e:
        print(f"recon-challenge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
