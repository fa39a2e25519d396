"""The replica's HTTP API, tested end to end: real server processes, real HTTP over loopback, no mocks.

Five servers run for the whole module (started together), each on its own copy of one tiny replica (so their
call logs are separate): `main` has no rate limits and takes two keys from $RECON_API_KEY; `limited` takes its
keys from a keys file and allows one logits call and one submission per 1.5 s per key; `x255` and
`channels_last` read logits inputs in those input conventions; `faulty` injects a fixed sequence of test faults
into its first logits calls and allows one accepted logits call per minute per key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np
import pytest
import requests
from helpers import ReplicaServer

from recon.conventions import encode
from recon.dataset_io import Dataset
from recon.replica import Replica, build_replica
from recon.server import FaultQueue, RateLimiter, create_app, key_id, load_keys, parse_faults
from recon.submission import MAX_BYTES

TASK = "12-data-reconstruction"
INTERVAL = 1.5
CONVENTION_SERVERS = ("x255", "channels_last")
FAULTS = ["error503:2", "malformed:1", "wrong_count:1", "slow:1", "error500:1"]
FAULT_DELAY = 1.0
KEY_A, KEY_A2 = "main-key-" + os.urandom(8).hex(), "main-key2-" + os.urandom(8).hex()
KEY_B, KEY_B2 = "limited-key-" + os.urandom(8).hex(), "limited-key2-" + os.urandom(8).hex()
ENV_ONLY_KEY = "env-only-" + os.urandom(8).hex()
ALL_KEYS = (KEY_A, KEY_A2, KEY_B, KEY_B2, ENV_ONLY_KEY)


def make_pool(per_class: int = 12, classes: int = 10, seed: int = 0) -> Dataset:
    """Seeded class-coloured noise images, float32 (N, 3, 32, 32) in [0, 1]."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    means = rng.random((classes, 3, 1, 1))
    images = means[labels] + 0.15 * rng.standard_normal((len(labels), 3, 32, 32))
    return Dataset(np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64))


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def rand_images(n: int, seed: int = 0, shape: tuple[int, ...] = (3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Server = ReplicaServer


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Replica:
    out = tmp_path_factory.mktemp("replica") / "rep"
    pool = make_pool()
    return build_replica(out, pool=pool, pool_name="test", aux_per_class=5, targets_per_class=2, epochs=1)


@pytest.fixture(scope="module")
def servers(replica, tmp_path_factory):
    base = tmp_path_factory.mktemp("servers")
    names = ("main", "limited", *CONVENTION_SERVERS, "faulty")
    for name in names:
        shutil.copytree(replica.root, base / name)
    keys_file = base / "keys.txt"
    keys_file.write_text(f"# test keys\n\n{KEY_B}\n  {KEY_B2}  \n# {KEY_A}\n")
    env_a = f"{KEY_A}, {KEY_A2}"
    intervals = ["--logits-interval", str(INTERVAL), "--submit-interval", str(INTERVAL)]
    fault_args = [a for spec in FAULTS for a in ("--fault", spec)]
    args = {
        "main": ([], env_a),
        # ENV_ONLY_KEY must be ignored: the keys file wins
        "limited": (["--keys-file", str(keys_file), *intervals], ENV_ONLY_KEY),
        **{c: (["--input-convention", c], env_a) for c in CONVENTION_SERVERS},
        "faulty": ([*fault_args, "--fault-delay", str(FAULT_DELAY), "--logits-interval", "60"], env_a),
    }
    started: dict[str, Server] = {}
    try:
        for name in names:
            started[name] = Server(base / name, args[name][1], *args[name][0]).start(wait=False)
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def limited(servers) -> Server:
    return servers["limited"]


def post_logits(url: str, key: str | None, payload: bytes, *, field: str = "npz", task: str = TASK):
    headers = {} if key is None else {"X-API-Key": key}
    files = {field: ("batch.npz", payload)}
    return requests.post(f"{url}/{task}/logits", headers=headers, files=files, timeout=60)


def post_submit(url: str, key: str | None, payload: bytes, *, filename: str = "submission.npz",
                field: str = "file", task: str = TASK):
    headers = {} if key is None else {"X-API-Key": key}
    files = {field: (filename, payload)}
    return requests.post(f"{url}/submit/{task}", headers=headers, files=files, timeout=120)


def logits_of(response: requests.Response) -> np.ndarray:
    return np.array([r["logits"] for r in response.json()["results"]])


def assert_alive(server: Server, replica: Replica) -> None:
    assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"
    images = replica.aux.images[:2]
    r = post_logits(server.url, KEY_A, npz(images=images))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(logits_of(r), replica.logits(images), atol=1e-5)


# --- keys and limiter, in process ---------------------------------------------------------------------------


def test_load_keys_from_file_env_and_nowhere(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\n\n  k1  \nk2\n#k3\nk1\n")
    monkeypatch.setenv("RECON_API_KEY", "ignored")
    assert load_keys(f) == ["k1", "k2"]
    monkeypatch.setenv("RECON_API_KEY", " e1 , e2,,")
    assert load_keys(None) == ["e1", "e2"]
    monkeypatch.delenv("RECON_API_KEY")
    with pytest.raises(ValueError, match="no API key configured: set RECON_API_KEY or pass --keys-file"):
        load_keys(None)
    (tmp_path / "empty").write_text("# only-a-comment-secret\n")
    with pytest.raises(ValueError, match="holds no API key") as e:
        load_keys(tmp_path / "empty")
    assert "secret" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read keys file"):
        load_keys(tmp_path / "missing")


def test_rate_limiter_counts_only_kept_slots():
    now = [100.0]
    lim = RateLimiter(10.0, clock=lambda: now[0])
    first = lim.reserve("a")
    assert not isinstance(first, float)
    assert lim.reserve("a") == pytest.approx(10.0)
    assert not isinstance(lim.reserve("b"), float)  # per key
    lim.cancel(first)  # the call was refused: the key may call again at once
    second = lim.reserve("a")
    assert not isinstance(second, float)
    now[0] += 4.0
    assert lim.reserve("a") == pytest.approx(6.0)
    now[0] += 6.0
    assert not isinstance(lim.reserve("a"), float)
    lim.cancel(second)  # stale: a later call holds the slot, which must stay taken
    assert isinstance(lim.reserve("a"), float)
    off = RateLimiter(0)
    assert not isinstance(off.reserve("a"), float) and not isinstance(off.reserve("a"), float)


def test_cli_refuses_to_serve_without_a_key(replica):
    env = {k: v for k, v in os.environ.items() if k != "RECON_API_KEY"}
    p = subprocess.run(
        [sys.executable, "-m", "recon.challenge_cli", "serve", str(replica.root), "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 2
    assert "no API key configured: set RECON_API_KEY or pass --keys-file" in p.stderr


# --- health, auth, task id ----------------------------------------------------------------------------------


def test_health_needs_no_key(main, replica):
    r = requests.get(main.url + "/health", timeout=5)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "task_id": TASK, "replica_id": replica.id, "input_convention": "raw"}


@pytest.mark.parametrize("key", [None, "wrong-key", "", KEY_B])
@pytest.mark.parametrize("endpoint", ["logits", "submit"])
def test_missing_or_wrong_key_is_401(main, replica, key, endpoint):
    post = post_logits if endpoint == "logits" else post_submit
    r = post(main.url, key, npz(images=replica.targets.images))
    assert r.status_code == 401
    assert r.json() == {"detail": "Invalid or missing API key."}


def test_every_configured_key_works(main, limited, replica):
    payload = npz(images=replica.aux.images[:1])
    assert post_logits(main.url, KEY_A, payload).status_code == 200
    assert post_logits(main.url, KEY_A2, payload).status_code == 200  # second key of RECON_API_KEY="a, b"
    assert post_logits(limited.url, ENV_ONLY_KEY, payload).status_code == 401  # keys file wins over env


@pytest.mark.parametrize("endpoint", ["logits", "submit"])
def test_wrong_task_id_is_404(main, replica, endpoint):
    post = post_logits if endpoint == "logits" else post_submit
    r = post(main.url, KEY_A, npz(images=replica.targets.images), task="99-other-task")
    assert r.status_code == 404
    assert "99-other-task" in r.json()["detail"]


# --- logits -------------------------------------------------------------------------------------------------


def test_logits_match_in_process_model_in_input_order(main, replica):
    images = replica.aux.images[:7]
    r = post_logits(main.url, KEY_A, npz(images=images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["batch_size"] == 7 and body["num_classes"] == 10
    assert len(body["results"]) == 7 and all(len(x["logits"]) == 10 for x in body["results"])
    got = logits_of(r)
    np.testing.assert_allclose(got, replica.logits(images), atol=1e-5)
    rev = post_logits(main.url, KEY_A, npz(images=images[::-1].copy()))
    np.testing.assert_allclose(logits_of(rev), got[::-1], atol=1e-5)


def test_logits_full_batch_of_100(main, replica):
    images = rand_images(100, seed=3)
    r = post_logits(main.url, KEY_A, npz(images=images))
    assert r.status_code == 200 and r.json()["batch_size"] == 100
    np.testing.assert_allclose(logits_of(r), replica.logits(images), atol=1e-5)


def test_concurrent_clients_get_their_own_results(main, replica):
    batches = [rand_images(1 + (i % 9), seed=100 + i) for i in range(20)]  # 4 threads x 5 calls

    def call(i: int) -> tuple[int, np.ndarray]:
        r = post_logits(main.url, (KEY_A, KEY_A2)[i % 2], npz(images=batches[i]))
        assert r.status_code == 200, r.text
        return i, logits_of(r)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, range(len(batches))))
    for i, got in results:
        np.testing.assert_allclose(got, replica.logits(batches[i]), atol=1e-5)


ONE = rand_images(3, seed=7)
BAD_LOGITS = {
    "too_many": (npz(images=rand_images(101)), "Too many images: got 101, limit 100 per call."),
    "image_shape": (
        npz(images=rand_images(5, shape=(3, 16, 16))),
        "Submitted images must have shape (N, 3, 32, 32), but got (5, 3, 16, 16).",
    ),
    "rank3": (npz(images=ONE[0]), "Submitted images must have shape (N, C, H, W), but got (3, 32, 32)."),
    "float64": (
        npz(images=ONE.astype(np.float64)),
        "Submitted images must be of type torch.float32, but got torch.float64.",
    ),
    "empty": (npz(images=ONE[:0]), "Submitted images must contain at least 1 image, but got 0."),
    "pickled": (npz(images=np.array([{"evil": 1}], dtype=object)), re.compile(r"Failed to read \.npz: .+")),
    "strings": (npz(images=np.array(["abc"])), re.compile(r"Failed to convert 'images' to torch tensor: .+")),
    "not_npz": (b"definitely not a zip file", "File must be .npz and contain an 'images' array."),
    "no_images_key": (npz(pictures=ONE), "File must be .npz and contain an 'images' array."),
    "extra_key": (npz(images=ONE, labels=np.arange(3)), "File must be .npz and contain an 'images' array."),
    "nan": (
        npz(images=np.full_like(ONE, np.nan)), "Submitted images must be finite, but got NaN or inf values."
    ),
    "inf_255": (
        npz(images=np.where(ONE > 0.5, np.float32(np.inf), ONE * 255)),
        "Submitted images must be finite, but got NaN or inf values.",
    ),
}


def _check_detail(detail: str, expected: str | re.Pattern) -> None:
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(detail), detail
    else:
        assert detail == expected


@pytest.mark.parametrize("case", list(BAD_LOGITS))
def test_bad_logits_upload_is_400_and_server_keeps_serving(main, replica, case):
    payload, expected = BAD_LOGITS[case]
    r = post_logits(main.url, KEY_A, payload)
    assert r.status_code == 400, r.text
    _check_detail(r.json()["detail"], expected)
    assert_alive(main, replica)


def test_logits_values_are_not_range_checked(main, replica):
    """The input convention decides what values mean (0..255, normalised), so any finite float32 is accepted."""
    for images in (ONE * 255, ONE - 0.5, np.full_like(ONE, -1e6)):
        r = post_logits(main.url, KEY_A, npz(images=images))
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(logits_of(r), replica.logits(images), rtol=1e-5, atol=1e-4)


def test_bad_logits_forms_are_400(main, replica):
    url, headers, good = f"{main.url}/{TASK}/logits", {"X-API-Key": KEY_A}, npz(images=ONE)
    r = requests.post(url, headers=headers, files={"file": ("batch.npz", good)}, timeout=30)
    assert r.status_code == 400 and "'npz'" in r.json()["detail"] and "'file'" in r.json()["detail"]
    r = requests.post(url, headers=headers, data={"npz": "not a file"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["detail"] == "Form field 'npz' must be a file upload, not a text value."
    r = requests.post(url, headers=headers, json={"images": ONE.tolist()}, timeout=30)
    assert r.status_code == 400 and r.json()["detail"].startswith("Missing form field 'npz'")
    r = requests.post(url, headers={**headers, "Content-Type": "multipart/form-data"}, data=b"xx", timeout=30)
    assert r.status_code == 400 and "multipart" in r.json()["detail"]
    assert_alive(main, replica)


# --- submit -------------------------------------------------------------------------------------------------


def test_submit_returns_id_and_in_process_score(main, replica):
    for images in (rand_images(20, seed=11), replica.targets.images):
        r = post_submit(main.url, KEY_A, npz(images=images))
        assert r.status_code == 200, r.text
        body = r.json()
        assert re.fullmatch(r"[0-9a-f]{32}", body["submission_id"])
        assert body["score"] == pytest.approx(replica.score(images), abs=1e-6)
        assert body["rule"] == replica.rule and body["task_id"] == TASK


BAD_SUBMISSIONS = {
    "txt_name": ({"filename": "submission.txt"}, npz(images=rand_images(20)),
                 "File must be .npz and contain an 'images' array."),
    "shape": ({}, npz(images=rand_images(100)),
              "Submitted images must have shape (20, 3, 32, 32), but got (100, 3, 32, 32)."),
    "float64": ({}, npz(images=rand_images(20).astype(np.float64)),
                "Submitted images must be of type torch.float32, but got torch.float64."),
    "out_of_range": ({}, npz(images=rand_images(20) - 0.5),
                     re.compile(r"Submitted images must have values in \[0, 1\], but got min -.+, max .+\.")),
    "x255": ({}, npz(images=rand_images(20) * 255),  # logits take 0..255 now; submissions never do
             re.compile(r"Submitted images must have values in \[0, 1\], but got min .+, max 2\d\d\.?\d*\.")),
    "pickled": ({}, npz(images=np.array([None], dtype=object)), re.compile(r"Failed to read \.npz: .+")),
    "extra_key": ({}, npz(images=rand_images(20), x=np.zeros(1)),
                  "File must be .npz and contain an 'images' array."),
    "wrong_field": ({"field": "npz"}, npz(images=rand_images(20)),
                    re.compile(r"Missing form field 'file'.+")),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_bad_submission_is_400_and_server_keeps_serving(main, replica, case):
    kwargs, payload, expected = BAD_SUBMISSIONS[case]
    r = post_submit(main.url, KEY_A, payload, **kwargs)
    assert r.status_code == 400, r.text
    _check_detail(r.json()["detail"], expected)
    assert_alive(main, replica)


def test_upload_over_max_bytes_is_413(main, replica):
    t0 = time.perf_counter()
    r = post_submit(main.url, KEY_A, bytes(MAX_BYTES + 1), filename="big.npz")
    seconds = time.perf_counter() - t0
    assert r.status_code == 413
    assert r.json()["detail"] == f"File too large: {MAX_BYTES + 1} bytes (limit 209715200)."
    assert seconds < 30, f"a {MAX_BYTES + 1}-byte upload took {seconds:.1f} s"
    assert_alive(main, replica)


def test_declared_oversize_body_is_413_without_reading_it(main, replica):
    size = 10 * MAX_BYTES
    head = (
        f"POST /{TASK}/logits HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY_A}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {size}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(main.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(head.encode())  # and no body at all: the answer must not wait for it
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body == {"detail": f"File too large: {size} bytes (limit 209715200)."}
    assert_alive(main, replica)


# --- rate limits (the `limited` server) ---------------------------------------------------------------------


def _retry_after(r: requests.Response) -> int:
    assert r.status_code == 429, r.text
    m = re.fullmatch(r"Rate limit exceeded\. Try again in (\d+) seconds\.", r.json()["detail"])
    assert m, r.json()
    n = int(m.group(1))
    assert r.headers["Retry-After"] == str(n)
    return n


def test_logits_rate_limit_is_per_key_and_expires(limited):
    small = npz(images=rand_images(2))
    assert post_logits(limited.url, KEY_B, small).status_code == 200
    accepted = time.monotonic()
    n = _retry_after(post_logits(limited.url, KEY_B, npz(images=rand_images(100))))  # 1.2 MB body: clean 429
    assert 1 <= n <= 2
    assert post_logits(limited.url, KEY_B2, small).status_code == 200  # another key has its own slot
    _retry_after(post_logits(limited.url, KEY_B, npz(images=rand_images(2, seed=1).astype(np.float64))))
    time.sleep(max(0.0, accepted + INTERVAL + 0.1 - time.monotonic()))
    assert post_logits(limited.url, KEY_B, small).status_code == 200


def test_refused_upload_does_not_use_the_slot(limited):
    time.sleep(INTERVAL + 0.1)  # both keys' slots are free again
    bad = post_logits(limited.url, KEY_B, npz(images=rand_images(2).astype(np.float64)))
    assert bad.status_code == 400
    assert post_logits(limited.url, KEY_B, npz(images=rand_images(2))).status_code == 200
    _retry_after(post_logits(limited.url, KEY_B, npz(images=rand_images(2))))


def test_submit_rate_limit(limited, replica):
    payload = npz(images=replica.targets.images)
    r = post_submit(limited.url, KEY_B2, payload)
    assert r.status_code == 200, r.text
    assert 1 <= _retry_after(post_submit(limited.url, KEY_B2, payload)) <= 2


# --- input conventions (the `x255` and `channels_last` servers) ------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTION_SERVERS)
def test_encoded_inputs_get_the_in_process_logits(servers, replica, convention):
    server = servers[convention]
    assert requests.get(server.url + "/health", timeout=5).json()["input_convention"] == convention
    images = replica.aux.images[:8]
    sent = encode(images, convention)
    assert not np.array_equal(sent, images)
    r = post_logits(server.url, KEY_A, npz(images=sent))
    assert r.status_code == 200, r.text
    assert r.json()["batch_size"] == 8
    want = replica.logits(images)
    np.testing.assert_allclose(logits_of(r), want, atol=1e-4)
    raw = post_logits(server.url, KEY_A, npz(images=images))  # a client that ignores the convention
    assert raw.status_code == 200, raw.text
    assert np.abs(logits_of(raw) - want).max() > 1e-2


def test_x255_server_takes_0_to_255_and_still_refuses_such_submissions(servers, replica):
    server = servers["x255"]
    images = rand_images(5, seed=21)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0.0, 1.0  # so that encode() spans exactly 0..255
    sent = encode(images, "x255")
    assert sent.min() == 0.0 and sent.max() == 255.0
    r = post_logits(server.url, KEY_A, npz(images=sent))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(logits_of(r), replica.logits(images), atol=1e-4)
    bad = post_submit(server.url, KEY_A, npz(images=encode(replica.targets.images, "x255")))
    assert bad.status_code == 400
    assert bad.json()["detail"].startswith("Submitted images must have values in [0, 1], but got min ")
    ok = post_submit(server.url, KEY_A, npz(images=replica.targets.images))  # submissions are always raw
    assert ok.status_code == 200 and ok.json()["score"] == pytest.approx(replica.score(replica.targets.images))


def test_unknown_convention_or_fault_spec_is_refused_in_process(replica):
    with pytest.raises(ValueError, match="unknown input convention 'bgr'"):
        create_app(replica, keys=["k"], input_convention="bgr")
    with pytest.raises(ValueError, match="bad fault spec 'timeout:1': unknown kind 'timeout'"):
        create_app(replica, keys=["k"], faults=["error503:1", "timeout:1"])
    with pytest.raises(ValueError, match="fault delay"):
        create_app(replica, keys=["k"], fault_delay=-1)


# --- injected faults (the `faulty` server) ------------------------------------------------------------------


def test_parse_faults_and_fault_queue():
    assert parse_faults(None) == [] and parse_faults([]) == []
    specs = ["error503:2", "malformed:1", " slow : 1 "]
    assert parse_faults(specs) == [("error503", 2), ("malformed", 1), ("slow", 1)]
    for bad, why in [("error503", "expected KIND:N"), ("error404:1", "unknown kind 'error404'"),
                     ("slow:0", "N must be"), ("slow:-1", "N must be"), ("slow:x", "N must be"), ("slow:", "N must")]:
        with pytest.raises(ValueError, match=re.escape(f"bad fault spec {bad!r}: {why}")):
            parse_faults(["error500:1", bad])
    q = FaultQueue(parse_faults(specs))
    assert [q.take() for _ in range(6)] == ["error503", "error503", "malformed", "slow", None, None]


def test_faults_come_in_order_and_spare_the_slot_and_the_log(servers, replica):
    server = servers["faulty"]
    images = replica.aux.images[:4]
    payload = npz(images=images)
    want = replica.logits(images)
    # refused before the fault point: these calls take no fault
    assert post_logits(server.url, "wrong-key", payload).status_code == 401
    assert post_logits(server.url, KEY_A, payload, task="99-other-task").status_code == 404

    for _ in range(2):
        r = post_logits(server.url, KEY_A, payload)
        assert r.status_code == 503
        assert r.json() == {"detail": "Service temporarily unavailable (injected fault)."}

    r = post_logits(server.url, KEY_A, payload)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    with pytest.raises(ValueError):
        r.json()

    r = post_logits(server.url, KEY_A, payload)
    assert r.status_code == 200
    body = r.json()
    assert body["batch_size"] == 4 and len(body["results"]) == 3
    np.testing.assert_allclose(logits_of(r), want[:3], atol=1e-5)

    t0 = time.monotonic()
    r = post_logits(server.url, KEY_A, payload)  # slow, then answered normally: the faults took no slot
    assert time.monotonic() - t0 >= FAULT_DELAY
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(logits_of(r), want, atol=1e-5)

    r = post_logits(server.url, KEY_A, payload)
    assert r.status_code == 500
    assert r.json() == {"detail": "Service temporarily unavailable (injected fault)."}

    # the slow call was a real call: it holds KEY_A's slot (60 s interval)
    assert 50 <= _retry_after(post_logits(server.url, KEY_A, payload)) <= 60
    t0 = time.monotonic()
    r = post_logits(server.url, KEY_A2, payload)  # faults used up: a normal call
    assert time.monotonic() - t0 < FAULT_DELAY
    assert r.status_code == 200 and r.json()["batch_size"] == 4 and len(r.json()["results"]) == 4
    np.testing.assert_allclose(logits_of(r), want, atol=1e-5)

    assert [(e["endpoint"], e["key_id"], e["n_images"]) for e in _log_lines(server)] == [
        ("logits", key_id(KEY_A), 4),
        ("logits", key_id(KEY_A2), 4),
    ]


def test_cli_refuses_a_bad_fault_spec(replica):
    spec = "slow:zero"  # the other bad specs: test_parse_faults_and_fault_queue
    env = {k: v for k, v in os.environ.items() if k != "RECON_API_KEY"}  # the spec is checked before the keys
    p = subprocess.run(
        [sys.executable, "-m", "recon.challenge_cli", "serve", str(replica.root), "--port", str(free_port()),
         "--fault", "error503:1", "--fault", spec],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 2
    assert f"recon-challenge serve: error: bad fault spec {spec!r}" in p.stderr


# --- call log and secrecy -----------------------------------------------------------------------------------


def _log_lines(server: Server) -> list[dict]:
    if not server.call_log.exists():
        return []
    return [json.loads(line) for line in server.call_log.read_text().splitlines()]


def test_call_log_records_accepted_calls_by_key_id(main, replica):
    before = len(_log_lines(main))
    assert post_logits(main.url, KEY_A, npz(images=rand_images(3))).status_code == 200
    assert post_submit(main.url, KEY_A2, npz(images=replica.targets.images)).status_code == 200
    assert post_logits(main.url, KEY_A, npz(images=rand_images(101))).status_code == 400  # refused: no line
    assert post_logits(main.url, "wrong", npz(images=rand_images(3))).status_code == 401
    new = _log_lines(main)[before:]
    assert [(e["endpoint"], e["n_images"], e["status"], e["key_id"]) for e in new] == [
        ("logits", 3, 200, key_id(KEY_A)),
        ("submit", 20, 200, key_id(KEY_A2)),
    ]
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:12]
    for e in new:
        assert datetime.fromisoformat(e["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0


def test_keys_never_reach_logs_or_output(servers, main, limited):
    assert _log_lines(limited), "the limited server accepted calls, so it has a log"
    for server in servers.values():
        for path in (server.call_log, server.output):
            if not path.exists():
                continue
            text = path.read_text()
            for key in ALL_KEYS:
                assert key not in text, f"a key leaked into {path.name}"
    assert "2 key(s)" in main.output.read_text()  # the startup line counts keys, never shows them


def test_server_still_healthy_after_everything(servers, main, replica):
    assert_alive(main, replica)
    assert all(server.proc.poll() is None for server in servers.values())
