"""The query ledger: every paid API response on disk before it is used, and a budget shared by processes.

Layout of a ledger directory (one per server and task):
    events.jsonl            append-only: one line per state change of a call (pending, ok, bad_response, failed)
    logits/<sha256>.json    the response to the batch whose exact float32 bytes hash to <sha256>
    submissions/<time>-<file sha256>.json   each submission's response with the sha256 of the file sent
    probe.json              the input convention the logits probe found best
    .lock                   a file lock: budget check, send and persist happen under it

A call counts against the budget from the moment it is about to be sent ("pending") unless it failed
without an answer; a crash mid-call therefore never lets the budget be exceeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from filelock import FileLock

from recon.atomic import atomic_write_json

SPENT = ("pending", "ok", "bad_response")


class BudgetExceeded(RuntimeError):
    pass


def batch_sha256(batch: np.ndarray) -> str:
    """Content address of a logits query: the exact float32 bytes sent."""
    return hashlib.sha256(np.ascontiguousarray(batch, dtype=np.float32).tobytes()).hexdigest()


def ledger_dir(root: str | os.PathLike, base_url: str, task_id: str) -> Path:
    """One ledger per server and task, so rehearsals on a replica never spend the real budget."""
    u = urlparse(base_url)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{u.hostname}_{u.port or ''}{u.path}".rstrip("_"))
    return Path(root) / f"{name}__{task_id}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Ledger:
    def __init__(self, root: str | os.PathLike, *, max_logits_calls: int | None = None,
                 max_submissions: int | None = None, lock_timeout: float = 3600.0):
        self.root = Path(root)
        (self.root / "logits").mkdir(parents=True, exist_ok=True)
        (self.root / "submissions").mkdir(parents=True, exist_ok=True)
        self.max = {"logits": max_logits_calls, "submit": max_submissions}
        self._lock = FileLock(str(self.root / ".lock"), timeout=lock_timeout)

    # -- reading ------------------------------------------------------------------------------------------
    def events(self) -> list[dict]:
        path = self.root / "events.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-append: skip it, keep the rest
                continue
        return out

    def calls(self) -> list[dict]:
        """One record per call (its latest state), in the order the calls were made."""
        latest: dict[str, dict] = {}
        for e in self.events():
            rec = latest.setdefault(e["call_id"], {**e, "started": e["time"]})
            rec.update(e)
        return list(latest.values())

    def spent(self, kind: str) -> int:
        return sum(1 for c in self.calls() if c["kind"] == kind and c["status"] in SPENT)

    def lookup_logits(self, sha: str) -> np.ndarray | None:
        path = self.root / "logits" / f"{sha}.json"
        if not path.is_file():
            return None
        return np.asarray(json.loads(path.read_text())["logits"], dtype=np.float32)

    def probe_result(self) -> dict | None:
        path = self.root / "probe.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # -- writing ------------------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    def _append(self, record: dict) -> None:
        with open(self.root / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def check_budget(self, kind: str) -> None:
        limit = self.max.get(kind)
        if limit is None:
            return
        used = self.spent(kind)
        if used + 1 > limit:
            what = "logits calls" if kind == "logits" else "submissions"
            knob = "challenge.max_logits_calls" if kind == "logits" else "challenge.max_submissions"
            raise BudgetExceeded(
                f"budget exhausted: {used} of {limit} {what} already spent (ledger {self.root}); "
                f"nothing was sent. Raise {knob} to allow more."
            )

    def begin(self, kind: str, sha: str, n_images: int) -> str:
        """Record the intent to send (under the lock, after check_budget); returns the call id."""
        call_id = f"{kind}-{time.time_ns()}-{sha[:12]}"
        self._append({"call_id": call_id, "kind": kind, "sha256": sha, "n_images": n_images,
                      "status": "pending", "time": _now()})
        return call_id

    def finish(self, call_id: str, kind: str, sha: str, status: str, **extra) -> None:
        self._append({"call_id": call_id, "kind": kind, "sha256": sha, "status": status, "time": _now(), **extra})

    def store_logits(self, call_id: str, sha: str, logits: np.ndarray, response: dict) -> None:
        atomic_write_json(self.root / "logits" / f"{sha}.json", {
            "sha256": sha, "time": _now(), "n_images": len(logits), "logits": logits.tolist(), "response": response,
        })
        self.finish(call_id, "logits", sha, "ok")

    def store_submission(self, call_id: str, file_sha: str, response: dict) -> Path:
        path = self.root / "submissions" / f"{time.strftime('%Y%m%d-%H%M%S')}-{file_sha[:16]}.json"
        atomic_write_json(path, {"file_sha256": file_sha, "time": _now(), "response": response})
        self.finish(call_id, "submit", file_sha, "ok", submission_id=response.get("submission_id"),
                    score=response.get("score"))
        return path

    def store_probe(self, result: dict) -> None:
        atomic_write_json(self.root / "probe.json", {**result, "time": _now()})
