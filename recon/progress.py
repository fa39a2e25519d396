"""Progress bars that stay quiet in CI and when output is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def track(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    return tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(), leave=False)
