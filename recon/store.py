"""The app's composed config for the command-line tools, so they read the same store, ledger and server."""

from __future__ import annotations

import argparse

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from recon.config import CONF_DIR, register_resolvers


def compose_app(overrides: list[str] | None = None) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides or [])


def default_store(overrides: list[str] | None = None) -> tuple[str, str, str]:
    """(tracking uri, experiment, state root) from the composed default config."""
    cfg = compose_app(overrides)
    return str(cfg.tracking.uri), str(cfg.tracking.experiment), str(cfg.paths.state)


def add_store_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--state", help="state root (default: ./mlruns)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the state root's SQLite store)")


def store_from_args(args: argparse.Namespace) -> tuple[str, str]:
    overrides = [f"paths.state={args.state}"] if args.state else []
    uri, exp, _ = default_store(overrides)
    return args.tracking_uri or uri, exp


def server_cfg(overrides: list[str]) -> DictConfig:
    """The `challenge` node for tools that talk to a server: `challenge=remote` unless another is chosen."""
    if not any(o.split("=")[0].lstrip("+~") == "challenge" for o in overrides):
        overrides = ["challenge=remote", *overrides]
    cfg = compose_app(overrides)
    if cfg.challenge.kind != "remote":
        raise ValueError("this tool talks to a server: use challenge=remote or challenge=replica_server")
    return cfg
