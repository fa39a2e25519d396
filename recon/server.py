"""The competition's HTTP API, served over a replica: same routes, form fields, limits and messages.

A client written against this server (auth header, multipart field names, JSON shapes, 429 handling) works
unchanged against the real one, so the whole pipeline can be rehearsed offline. Differences from the real
server, all deliberate:

- `POST /submit/{task_id}` also returns the score and the rule (the real one only shows a leaderboard).
- `GET /health` (no auth) exists so that clients and tests can wait for readiness.
- Logits inputs must be float32, rank 4 with the replica's per-image shape, finite, 1..100 images; their values
  are NOT range-checked, because the server's input convention (below) may call for 0..255 or normalised
  (negative) values. Submissions keep every check, [0, 1] included.
- The input convention is a server option (`recon.conventions`): a server started with convention C feeds its
  model `decode(received, C)`, so a client sending `encode(raw, C)` gets the logits of `raw`, and a client
  sending raw images to a non-raw server gets near-chance predictions, as the public record saw. `GET /health`
  reports the convention.
- Fault injection, for tests only: `faults=["error503:2", "malformed:1"]` makes the first authenticated logits
  calls fail on purpose (see `parse_faults`).

Check order for both endpoints: auth (401), task id (404), declared request size (413), [logits only: injected
fault], rate limit (429), form and file contents (400/413), then the computation (200). Only accepted calls
(200) count against the rate limit and are written to the call log, so a mistyped upload never costs a
participant their slot; injected faults other than `slow` neither use the slot nor reach the call log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from recon.conventions import check as check_convention
from recon.conventions import decode
from recon.replica import Replica, load_replica
from recon.submission import (
    MAX_BYTES,
    SubmissionError,
    read_images_npz,
    validate_submission_bytes,
)

KEY_ENV = "RECON_API_KEY"
MAX_LOGITS_BATCH = 100
AUTH_DETAIL = "Invalid or missing API key."
# Room for multipart boundaries and part headers around a file of exactly MAX_BYTES.
MULTIPART_SLACK = 1 << 20

FAULT_KINDS = ("error503", "error500", "slow", "malformed", "wrong_count")
MALFORMED_BODY = '{"results": ['

log = logging.getLogger("recon.server")


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key: what logs and rate limits use instead of the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def load_keys(keys_file: str | os.PathLike | None) -> list[str]:
    """Keys from `keys_file` (one per line; blank lines and full-line `#` comments ignored), else from
    $RECON_API_KEY (comma-separated for several). An explicit file wins over the environment.

    Raises ValueError when no key is configured; messages never contain key values.
    """
    if keys_file is not None:
        path = Path(keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{path}: cannot read keys file ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: keys file is not UTF-8 text") from e
        candidates = [s.strip() for s in text.splitlines()]
        keys = [s for s in candidates if s and not s.startswith("#")]
        if not keys:
            raise ValueError(f"{path}: keys file holds no API key (one per line; '#' starts a comment)")
    else:
        keys = [s.strip() for s in os.environ.get(KEY_ENV, "").split(",") if s.strip()]
        if not keys:
            raise ValueError(f"no API key configured: set {KEY_ENV} or pass --keys-file")
    return list(dict.fromkeys(keys))  # drop duplicates, keep order


@dataclass(frozen=True)
class _Slot:
    """A reservation made by `RateLimiter.reserve`, handed back to `cancel` if the call is refused."""

    kid: str
    stamp: float
    previous: float | None


class RateLimiter:
    """At most one accepted call per `interval` seconds per key id; `interval <= 0` turns it off.

    A call reserves its slot when it starts, so two concurrent calls with one key cannot both get through;
    a call refused later (bad upload) cancels its reservation, so only accepted calls start the interval.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        if not interval >= 0:  # also rejects NaN
            raise ValueError(f"rate-limit interval must be >= 0 seconds, got {interval}")
        self.interval = float(interval)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, kid: str) -> _Slot | float:
        """Take the slot (returns a `_Slot`) or return the seconds left to wait."""
        with self._lock:
            now = self._clock()
            last = self._last.get(kid)
            if self.interval > 0 and last is not None:
                wait = last + self.interval - now
                if wait > 0:
                    return wait
            self._last[kid] = now
            return _Slot(kid, now, last)

    def cancel(self, slot: _Slot) -> None:
        """Give a slot back, unless a later call has taken the key's slot since."""
        with self._lock:
            if self._last.get(slot.kid) == slot.stamp:
                if slot.previous is None:
                    del self._last[slot.kid]
                else:
                    self._last[slot.kid] = slot.previous


def parse_faults(specs: list[str] | None) -> list[tuple[str, int]]:
    """`["error503:2", "malformed:1"]` -> `[("error503", 2), ("malformed", 1)]`, in the order given.

    A spec is `KIND:N`: the next N authenticated logits calls get fault KIND (one of FAULT_KINDS), N >= 1.
    Raises ValueError naming the bad spec.
    """
    out = []
    for spec in specs or []:
        kind, sep, count = str(spec).partition(":")
        kind, count = kind.strip(), count.strip()
        why = None
        if not sep:
            why = "expected KIND:N"
        elif kind not in FAULT_KINDS:
            why = f"unknown kind {kind!r}"
        elif not count.isdigit() or int(count) < 1:
            why = f"N must be a whole number >= 1, got {count!r}"
        if why is not None:
            raise ValueError(f"bad fault spec {spec!r}: {why} (SPEC is KIND:N, KIND one of {', '.join(FAULT_KINDS)})")
        out.append((kind, int(count)))
    return out


def _check_fault_delay(seconds: float) -> float:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"fault delay must be a finite number of seconds >= 0, got {seconds}")
    return float(seconds)


class FaultQueue:
    """Hands out injected faults to successive calls: `take()` returns the next call's fault kind or None."""

    def __init__(self, faults: list[tuple[str, int]]):
        self._left = [[kind, n] for kind, n in faults]
        self._lock = threading.Lock()

    def take(self) -> str | None:
        with self._lock:
            while self._left and self._left[0][1] <= 0:
                self._left.pop(0)
            if not self._left:
                return None
            self._left[0][1] -= 1
            return self._left[0][0]


class CallLog:
    """Append-only JSON-lines record of accepted calls: the replica's account of the query budget spent."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class _Service:
    """The state behind the routes: keys, limits, the model lock and the call log."""

    def __init__(
        self,
        replica: Replica,
        keys: list[str],
        logits_interval: float,
        submit_interval: float,
        call_log: Path | None,
        input_convention: str = "raw",
    ):
        if not keys or any(not k for k in keys):
            raise ValueError("create_app needs at least one non-empty API key")
        self.replica = replica
        self.input_convention = check_convention(input_convention)
        self._keys = [(k.encode("utf-8"), key_id(k)) for k in keys]
        self.limits = {"logits": RateLimiter(logits_interval), "submit": RateLimiter(submit_interval)}
        self.log = CallLog(Path(call_log) if call_log is not None else Path(replica.root) / "calls.log.jsonl")
        # One lock for the model and the scorer: torch is not safe to drive from several threads here.
        self._compute = threading.Lock()
        self.image_shape = tuple(int(s) for s in replica.aux.images.shape[1:])
        self.target_shape = tuple(int(s) for s in replica.targets.images.shape)
        with self._compute:
            _ = replica.model  # load now, so the first call is not slow and never races the lazy load

    def authenticate(self, request: Request) -> str | None:
        """Return the key id of a valid `X-API-Key`, else None; every key is compared, in constant time."""
        given = request.headers.get("x-api-key")
        if given is None:
            return None
        raw = given.encode("utf-8", "surrogateescape")
        found = None
        for key, kid in self._keys:
            if hmac.compare_digest(raw, key):
                found = kid
        return found

    def logits(self, data: bytes) -> np.ndarray:
        images = decode(self.validate_batch(read_images_npz(data)), self.input_convention)
        with self._compute:
            return np.asarray(self.replica.logits(images), dtype=np.float64)

    def validate_batch(self, arr: np.ndarray) -> np.ndarray:
        """The checks of a logits call, with the submission checks' messages: convertible to a tensor, rank 4,
        float32, finite, the replica's per-image shape, 1..MAX_LOGITS_BATCH images. No value range: what the
        values mean is the input convention's business."""
        try:
            tensor = torch.from_numpy(np.asarray(arr))
        except Exception as e:  # e.g. strings or objects
            raise SubmissionError(f"Failed to convert 'images' to torch tensor: {e}") from e
        if tensor.ndim != 4:
            raise SubmissionError(
                f"Submitted images must have shape (N, C, H, W), but got {_shape_str(tensor.shape)}."
            )
        if tensor.dtype != torch.float32:
            raise SubmissionError(f"Submitted images must be of type torch.float32, but got {tensor.dtype}.")
        if not torch.isfinite(tensor).all():
            raise SubmissionError("Submitted images must be finite, but got NaN or inf values.")
        self._check_image_shape(tuple(tensor.shape))
        if len(tensor) == 0:
            raise SubmissionError("Submitted images must contain at least 1 image, but got 0.")
        if len(tensor) > MAX_LOGITS_BATCH:
            raise SubmissionError(f"Too many images: got {len(tensor)}, limit {MAX_LOGITS_BATCH} per call.")
        return tensor.numpy()

    def _check_image_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape[1:]) != self.image_shape:
            want = "(N, " + _shape_str(self.image_shape)[1:]
            raise SubmissionError(f"Submitted images must have shape {want}, but got {_shape_str(shape)}.")

    def score(self, data: bytes, filename: str) -> tuple[int, float]:
        images = validate_submission_bytes(data, filename, self.target_shape)
        with self._compute:
            return len(images), float(self.replica.score(images))

    def record(self, kid: str, endpoint: str, n_images: int, **extra: object) -> None:
        """Log an accepted call; a failing log must not turn an answered call into an error."""
        entry = {"time": _utc_now(), "key_id": kid, "endpoint": endpoint, "n_images": n_images, "status": 200}
        entry.update(extra)
        try:
            self.log.append(entry)
        except OSError as e:
            log.warning("cannot append to call log %s: %s", self.log.path, e.strerror)


async def _read_upload(request: Request, field: str, *, require_npz_name: bool) -> tuple[bytes, str]:
    """Read one uploaded file from the multipart form ourselves, so that a missing or wrong field is a 400
    with a message naming the field (FastAPI's own validation would answer 422)."""
    try:
        async with request.form(max_files=8, max_fields=32) as form:
            values = form.getlist(field)
            if not values:
                present = ", ".join(repr(k) for k in dict.fromkeys(form.keys())) or "none"
                raise SubmissionError(
                    f"Missing form field '{field}': send the .npz file as multipart/form-data "
                    f"field '{field}' (fields received: {present})."
                )
            if len(values) > 1:
                raise SubmissionError(f"Form field '{field}' must hold exactly one file, got {len(values)}.")
            upload = values[0]
            if not isinstance(upload, UploadFile):
                raise SubmissionError(f"Form field '{field}' must be a file upload, not a text value.")
            filename = upload.filename or ""
            if require_npz_name and not filename.endswith(".npz"):
                raise SubmissionError("File must be .npz and contain an 'images' array.")
            if upload.size is not None and upload.size > MAX_BYTES:  # refuse before reading it into memory
                raise SubmissionError(f"File too large: {upload.size} bytes (limit {MAX_BYTES}).", status=413)
            return await upload.read(), filename
    except SubmissionError:
        raise
    except StarletteHTTPException as e:  # what Starlette raises for malformed multipart bodies
        raise SubmissionError(f"Invalid multipart/form-data request: {e.detail}") from e
    except Exception as e:  # client disconnects, broken encodings: refuse the call, keep serving
        raise SubmissionError(f"Could not read the multipart/form-data request ({type(e).__name__}).") from e


def _declared_too_large(request: Request) -> int | None:
    """The declared body size when it cannot hold a file within the limit, so we refuse without reading it.

    Such a 413 reports the request body size (the file inside is at most MULTIPART_SLACK smaller); uploads
    that pass this check are measured exactly after parsing.
    """
    try:
        declared = int(request.headers.get("content-length", ""))
    except ValueError:
        return None
    return declared if declared > MAX_BYTES + MULTIPART_SLACK else None


async def _drain(request: Request) -> None:
    """Read and discard the request body, so that a client whose call is refused on purpose still gets the
    answer rather than a connection reset halfway through its upload."""
    try:
        async for _ in request.stream():
            pass
    except Exception:  # client went away: nothing to answer anyway
        pass


def _logits_body(out: np.ndarray, batch_size: int) -> dict:
    return {
        "results": [{"logits": row} for row in out.tolist()],
        "batch_size": batch_size,
        "num_classes": int(out.shape[1]),
    }


def create_app(
    replica: Replica,
    *,
    keys: list[str],
    logits_interval: float = 0.0,
    submit_interval: float = 0.0,
    call_log: Path | None = None,
    input_convention: str = "raw",
    faults: list[str] | None = None,
    fault_delay: float = 3.0,
) -> FastAPI:
    """The API over `replica`. Rate limits are per key, in seconds between accepted calls (0 = off).

    The call log defaults to `<replica.root>/calls.log.jsonl`; it records key ids, never keys.
    `input_convention` (one of `recon.conventions.CONVENTIONS`) is how the server reads logits inputs: the
    model gets `decode(received, input_convention)`.

    `faults` (tests only) are `KIND:N` specs (`parse_faults`), applied in order to the first authenticated
    logits calls that pass the task-id and declared-size checks, before the rate limit:
    `error503` / `error500` answer that status with a JSON `detail`; `malformed` answers 200 with a body that
    is not JSON; `wrong_count` answers 200 with one result fewer than the batch (`batch_size` still n);
    `slow` waits `fault_delay` seconds, then handles the call normally (it may be accepted, rate-limited and
    logged like any call). The other kinds neither use the rate-limit slot nor reach the call log.
    """
    fault_queue = FaultQueue(parse_faults(faults))
    _check_fault_delay(fault_delay)
    svc = _Service(replica, keys, logits_interval, submit_interval, call_log, input_convention)
    task = replica.task_id
    app = FastAPI(title="recon replica API", docs_url=None, redoc_url=None, openapi_url=None)

    def _admit(request: Request, task_id: str) -> str | JSONResponse:
        """Auth, task id and declared size: everything decided from the headers, before any rate limit."""
        kid = svc.authenticate(request)
        if kid is None:
            return _error(401, AUTH_DETAIL)
        if task_id != task:
            return _error(404, f"Unknown task id '{task_id}'; this server serves '{task}'.")
        declared = _declared_too_large(request)
        if declared is not None:
            return _error(413, f"File too large: {declared} bytes (limit {MAX_BYTES}).")
        return kid

    def _reserve(kid: str, endpoint: str) -> _Slot | JSONResponse:
        slot = svc.limits[endpoint].reserve(kid)
        if not isinstance(slot, _Slot):
            n = max(1, math.ceil(slot))
            return _error(429, f"Rate limit exceeded. Try again in {n} seconds.", {"Retry-After": str(n)})
        return slot

    async def _faulted(request: Request, kind: str) -> Response:
        """The answer to a logits call that gets an injected fault (every kind but `slow`)."""
        log.info("injected fault: %s", kind)
        if kind == "wrong_count":
            try:
                data, _ = await _read_upload(request, "npz", require_npz_name=False)
                out = await run_in_threadpool(svc.logits, data)
            except SubmissionError as e:
                return _error(e.status, str(e))
            except Exception:
                log.exception("logits call failed")
                return _error(500, "Internal server error.")
            return JSONResponse(_logits_body(out[:-1], len(out)))
        await _drain(request)
        if kind == "malformed":
            return Response(MALFORMED_BODY, status_code=200, media_type="text/plain")
        status = {"error503": 503, "error500": 500}[kind]
        return _error(status, "Service temporarily unavailable (injected fault).")

    async def _guarded(slot: _Slot, endpoint: str, work):
        """Run a call's work; a refused or failed call gives its rate-limit slot back."""
        try:
            return await work()
        except SubmissionError as e:
            svc.limits[endpoint].cancel(slot)
            return _error(e.status, str(e))
        except Exception:
            svc.limits[endpoint].cancel(slot)
            log.exception("%s call failed", endpoint)
            return _error(500, "Internal server error.")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "task_id": task,
            "replica_id": replica.id,
            "input_convention": svc.input_convention,
        }

    @app.post("/{task_id}/logits")
    async def logits(task_id: str, request: Request) -> Response:
        kid = _admit(request, task_id)
        if isinstance(kid, JSONResponse):
            return kid
        fault = fault_queue.take()
        if fault == "slow":
            log.info("injected fault: slow (%.3g s)", fault_delay)
            await asyncio.sleep(fault_delay)
        elif fault is not None:
            return await _faulted(request, fault)
        slot = _reserve(kid, "logits")
        if isinstance(slot, JSONResponse):
            return slot
        async def work():
            data, _ = await _read_upload(request, "npz", require_npz_name=False)
            return await run_in_threadpool(svc.logits, data)

        out = await _guarded(slot, "logits", work)
        if isinstance(out, JSONResponse):
            return out
        await run_in_threadpool(svc.record, kid, "logits", len(out))
        return JSONResponse(_logits_body(out, len(out)))

    @app.post("/submit/{task_id}")
    async def submit(task_id: str, request: Request) -> JSONResponse:
        kid = _admit(request, task_id)
        if isinstance(kid, JSONResponse):
            return kid
        slot = _reserve(kid, "submit")
        if isinstance(slot, JSONResponse):
            return slot
        async def work():
            data, filename = await _read_upload(request, "file", require_npz_name=True)
            return await run_in_threadpool(svc.score, data, filename)

        result = await _guarded(slot, "submit", work)
        if isinstance(result, JSONResponse):
            return result
        n, score = result
        submission_id = secrets.token_hex(16)
        await run_in_threadpool(svc.record, kid, "submit", n, submission_id=submission_id)
        return JSONResponse(
            {"submission_id": submission_id, "score": score, "rule": replica.rule, "task_id": task}
        )

    return app


def run_server(
    replica_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    keys_file: str | None = None,
    logits_interval: float = 0.0,
    submit_interval: float = 0.0,
    input_convention: str = "raw",
    faults: list[str] | None = None,
    fault_delay: float = 3.0,
) -> None:
    """Check the options and load keys (first, to fail fast), then the replica, then serve until interrupted."""
    import uvicorn

    check_convention(input_convention)
    parsed = parse_faults(faults)
    _check_fault_delay(fault_delay)
    keys = load_keys(keys_file)
    replica = load_replica(replica_dir)
    app = create_app(
        replica, keys=keys, logits_interval=logits_interval, submit_interval=submit_interval,
        input_convention=input_convention, faults=faults, fault_delay=fault_delay,
    )
    extra = ""
    if parsed:
        extra = ", TEST FAULTS " + " ".join(f"{k}:{n}" for k, n in parsed) + f" (delay {fault_delay:g} s)"
    print(
        f"recon-challenge serve: replica {replica.id}, task {replica.task_id}, {len(keys)} key(s), "
        f"input convention {input_convention}{extra}, on http://{host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
