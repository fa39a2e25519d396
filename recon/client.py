"""The challenge API client: one class for the real server and the replica server (they speak the same API).

- 5xx, timeouts and connection errors: bounded retries with exponential backoff and jitter (urllib3 Retry).
- 429: wait what the server says (Retry-After, or "N seconds" in `detail`) plus a margin, then retry.
- other 4xx: fail at once with the server's message.
- every logits batch goes through the ledger: answered from disk when seen before, persisted before use,
  counted against a budget shared across processes.
The API key lives only in the session's headers: never in messages, logs or the ledger.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from pathlib import Path

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from recon.conventions import encode
from recon.ledger import Ledger, batch_sha256
from recon.progress import progress_enabled

MAX_BATCH = 100
KEY_ENV = "RECON_API_KEY"


class ApiError(RuntimeError):
    """The server refused or answered something unusable; nothing was cached."""


def load_api_key(api_key: str | None = None, key_file: str | os.PathLike | None = None) -> str:
    """The key from the config/env value, else from a key file kept outside the repo."""
    if api_key:
        return str(api_key).strip()
    if key_file:
        path = Path(key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ApiError(f"{path}: cannot read the API key file ({e.strerror})") from e
        if key:
            return key
        raise ApiError(f"{path}: the API key file is empty")
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return env
    raise ApiError(f"no API key: set {KEY_ENV} or challenge.api_key_file (a file outside the repo)")


def wait_seconds(resp: requests.Response) -> float | None:
    """How long a 429 asks us to wait: the Retry-After header, else "N seconds" in the detail text."""
    header = resp.headers.get("Retry-After")
    if header:
        try:
            return float(header)
        except ValueError:
            pass
    m = re.search(r"(\d+(?:\.\d+)?)\s*seconds?", resp.text or "")
    return float(m.group(1)) if m else None


def _detail(resp: requests.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail", body)) if isinstance(body, dict) else str(body)
    except ValueError:
        return (resp.text or "")[:300]


def countdown(seconds: float, what: str) -> None:
    """Sleep, showing a countdown on a terminal."""
    if not progress_enabled():
        time.sleep(seconds)
        return
    from tqdm.auto import tqdm

    end = time.monotonic() + seconds
    with tqdm(total=round(seconds), desc=f"rate limited ({what}): waiting", unit="s", leave=False) as bar:
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            bar.n = round(seconds - max(0.0, end - time.monotonic()))
            bar.refresh()


class ChallengeClient:
    def __init__(
        self,
        base_url: str,
        task_id: str,
        api_key: str,
        *,
        ledger: Ledger,
        convention: str = "raw",
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 5,
        backoff: float = 0.5,
        rate_margin: float = 1.0,
        max_rate_waits: int = 50,
    ):
        self.base_url = base_url.rstrip("/")
        self.task_id = task_id
        self.ledger = ledger
        self.convention = convention
        self.timeout = (connect_timeout, timeout)
        self.rate_margin = rate_margin
        self.max_rate_waits = max_rate_waits
        self.n_queries = 0  # real, paid calls
        self.n_images = 0
        self.n_cached = 0
        self.session = requests.Session()
        self.session.headers["X-API-Key"] = api_key
        retry = Retry(
            total=retries, connect=retries, read=retries, status=retries,
            backoff_factor=backoff, backoff_jitter=backoff / 2, backoff_max=30,
            status_forcelist=(500, 502, 503, 504), allowed_methods=None,  # POST too: a 5xx did no work
            raise_on_status=False, respect_retry_after_header=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _post(self, path: str, field: str, filename: str, data: bytes, what: str) -> requests.Response:
        url = f"{self.base_url}{path}"
        for _ in range(self.max_rate_waits + 1):
            try:
                resp = self.session.post(url, files={field: (filename, data, "application/octet-stream")},
                                         timeout=self.timeout)
            except requests.RequestException as e:
                raise ApiError(f"{what}: no answer from {url} after retries ({type(e).__name__})") from None
            if resp.status_code != 429:
                break
            wait = wait_seconds(resp)
            if wait is None:
                raise ApiError(f"{what}: rate limited (429) without a wait time: {_detail(resp)}")
            countdown(wait + self.rate_margin, what)
        else:
            raise ApiError(f"{what}: still rate limited after {self.max_rate_waits} waits")
        if resp.status_code != 200:
            raise ApiError(f"{what}: HTTP {resp.status_code} from {url}: {_detail(resp)}")
        return resp

    # -- logits -------------------------------------------------------------------------------------------
    def logits(self, images: np.ndarray) -> np.ndarray:
        """(n, 10) logits for raw [0, 1] images, in input order; batches of <= 100, one call each."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        return np.concatenate([self._logits_batch(images[i : i + MAX_BATCH])
                               for i in range(0, len(images), MAX_BATCH)])

    def _logits_batch(self, batch: np.ndarray) -> np.ndarray:
        sent = encode(batch, self.convention)
        sha = batch_sha256(sent)
        with self.ledger.locked():
            cached = self.ledger.lookup_logits(sha)
            if cached is not None:
                self.n_cached += 1
                return cached
            self.ledger.check_budget("logits")
            buf = io.BytesIO()
            np.savez(buf, images=sent)
            call_id = self.ledger.begin("logits", sha, len(batch))
            try:
                resp = self._post(f"/{self.task_id}/logits", "npz", "images.npz", buf.getvalue(), "logits")
            except ApiError as e:
                self.ledger.finish(call_id, "logits", sha, "failed", error=str(e)[:500])
                raise
            try:
                body = resp.json()
                logits = np.asarray([r["logits"] for r in body["results"]], dtype=np.float32)
            except (ValueError, KeyError, TypeError) as e:
                self.ledger.finish(call_id, "logits", sha, "bad_response", error="malformed JSON")
                raise ApiError(f"logits: malformed response from the server ({type(e).__name__}); "
                               "nothing was cached") from None
            if logits.ndim != 2 or len(logits) != len(batch):
                self.ledger.finish(call_id, "logits", sha, "bad_response", error="wrong number of logits")
                raise ApiError(f"logits: the server returned {len(logits)} results for {len(batch)} images; "
                               "nothing was cached")
            self.ledger.store_logits(call_id, sha, logits, body)  # on disk before anyone uses it
        self.n_queries += 1
        self.n_images += len(batch)
        return logits

    # -- submissions ------------------------------------------------------------------------------------
    def submit(self, path: str | os.PathLike) -> dict:
        """Send a submission file; the response is stored with the sha256 of the exact bytes sent."""
        path = Path(path)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        with self.ledger.locked():
            self.ledger.check_budget("submit")
            call_id = self.ledger.begin("submit", sha, 0)
            try:
                resp = self._post(f"/submit/{self.task_id}", "file", path.name, data, "submit")
                body = resp.json()
            except ApiError as e:
                self.ledger.finish(call_id, "submit", sha, "failed", error=str(e)[:500])
                raise
            except ValueError:
                self.ledger.finish(call_id, "submit", sha, "bad_response", error="malformed JSON")
                raise ApiError("submit: malformed response from the server") from None
            self.ledger.store_submission(call_id, sha, body)
        return body


def client_from_cfg(ch) -> ChallengeClient:
    """The client for a `challenge=remote`-style config node (base_url, task_id, key, ledger, budget)."""
    from recon.ledger import ledger_dir

    ledger = Ledger(ledger_dir(ch.ledger_dir, ch.base_url, ch.task_id),
                    max_logits_calls=ch.max_logits_calls, max_submissions=ch.max_submissions)
    convention = str(ch.convention)
    if convention == "probed":
        probe = ledger.probe_result()
        convention = probe["best"] if probe else "raw"
    return ChallengeClient(
        ch.base_url, ch.task_id, load_api_key(ch.api_key, ch.api_key_file), ledger=ledger, convention=convention,
        timeout=float(ch.timeout), retries=int(ch.retries), rate_margin=float(ch.rate_margin),
    )
