"""Which MLflow store the command-line tools read: the one the default config points at, unless told."""

from __future__ import annotations

import argparse

from hydra import compose, initialize_config_dir

from recon.config import CONF_DIR, register_resolvers


def default_store(overrides: list[str] | None = None) -> tuple[str, str, str]:
    """(tracking uri, experiment, state root) from the composed default config."""
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides or [])
    return str(cfg.tracking.uri), str(cfg.tracking.experiment), str(cfg.paths.state)


def add_store_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--state", help="state root (default: ./mlruns)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the state root's SQLite store)")


def store_from_args(args: argparse.Namespace) -> tuple[str, str]:
    overrides = [f"paths.state={args.state}"] if args.state else []
    uri, exp, _ = default_store(overrides)
    return args.tracking_uri or uri, exp
