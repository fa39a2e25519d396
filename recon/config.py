"""Where the configs live, the custom resolvers, and config helpers shared by the entrypoints."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

_PKG = Path(__file__).resolve().parent
# A wheel carries the configs inside the package; a source checkout keeps them at the top level.
CONF_DIR = _PKG / "conf" if (_PKG / "conf").is_dir() else _PKG.parent / "conf"

SECRET_KEY = re.compile(r"(key|token|secret|password|passwd|credential)", re.IGNORECASE)
REDACTED = "***REDACTED***"


def register_resolvers() -> None:
    """`${abspath:mlruns}`: a path resolved against the launch directory, once."""
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(os.path.expanduser(str(p))),
                                        use_cache=True)


def redact(obj):
    """A copy of a plain config container with every secret-looking key's value replaced."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def resolved_container(cfg: DictConfig, *, redacted: bool = True) -> dict:
    obj = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return redact(obj) if redacted else obj


def flatten(obj, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def as_plain(value):
    """OmegaConf containers to Python lists/dicts; scalars unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
