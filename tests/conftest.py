"""Shared fixtures: one small digits replica per test session, and configs composed against it."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from recon.builtin_data import load_digits_pool
from recon.config import CONF_DIR, register_resolvers
from recon.replica import build_replica


@pytest.fixture(scope="session")
def digits_replica(tmp_path_factory):
    """The default digits replica, with a briefly trained classifier to keep the session fast."""
    out = tmp_path_factory.mktemp("replicas") / "digits"
    return build_replica(out, pool=load_digits_pool(), pool_name="digits", epochs=3)


@pytest.fixture
def compose_cfg(tmp_path, digits_replica):
    """Compose the app's config like `recon` does, with the state root and replica in temp dirs."""
    register_resolvers()

    def _compose(*overrides: str, state=None):
        base = [f"paths.state={state or tmp_path / 'state'}", f"challenge.dir={digits_replica.root}"]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[*base, *overrides])

    return _compose
