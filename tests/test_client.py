"""The API client against the real replica server on loopback: rate limits, faults, ledger, budget, probe."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime

import numpy as np
import pytest
from helpers import ReplicaServer

from recon.api_cli import ledger_main, probe_conventions, submit_main
from recon.client import ApiError, ChallengeClient, load_api_key
from recon.ledger import BudgetExceeded, Ledger, batch_sha256
from recon.submission import write_submission

KEY = "sk-client-test-" + "7f3a9c"


@pytest.fixture
def rep_dir(tmp_path, digits_replica):
    """A private copy of the session replica, so each test's server has its own call log."""
    dst = tmp_path / "replica"
    shutil.copytree(digits_replica.root, dst)
    return dst


@pytest.fixture
def serve(rep_dir):
    servers = []

    def _serve(*args, port=None, start=True):
        s = ReplicaServer(rep_dir, KEY, *args, port=port)
        servers.append(s)
        return s.start() if start else s

    yield _serve
    for s in servers:
        s.stop()


def client(server, tmp_path, **kw) -> ChallengeClient:
    opts = {"retries": 3, "backoff": 0.2, "rate_margin": 0.2, **kw}
    budget = {k: opts.pop(k) for k in ("max_logits_calls", "max_submissions") if k in opts}
    return ChallengeClient(server.url, "12-data-reconstruction", KEY, ledger=Ledger(tmp_path / "ledger", **budget),
                           **opts)


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def test_logits_match_in_process_order_kept_and_batched(serve, tmp_path, digits_replica):
    c = client(serve(), tmp_path)
    x = images(130)
    got = c.logits(x)
    np.testing.assert_allclose(got, digits_replica.logits(x), atol=1e-4)
    assert (c.n_queries, c.n_images) == (2, 130)  # 100 + 30: one HTTP call per batch
    # persisted before use, content-addressed by the exact float32 bytes sent
    stored = c.ledger.lookup_logits(batch_sha256(x[:100]))
    np.testing.assert_array_equal(stored, got[:100])


def test_repeat_query_is_answered_from_the_ledger(serve, tmp_path):
    server = serve()
    x = images(10)
    first = client(server, tmp_path).logits(x)
    again = client(server, tmp_path)  # a new process would see the same: the ledger is on disk
    np.testing.assert_array_equal(again.logits(x), first)
    assert (again.n_queries, again.n_cached) == (0, 1)
    assert len(server.accepted_calls()) == 1


def test_rate_limit_is_honoured(serve, tmp_path):
    server = serve("--logits-interval", "1.5")
    c = client(server, tmp_path)
    for seed in range(3):
        c.logits(images(2, seed))
    times = [datetime.fromisoformat(r["time"]).timestamp() for r in server.accepted_calls()]
    gaps = np.diff(times)
    assert len(times) == 3 and (gaps >= 1.5).all(), gaps


def test_5xx_then_success(serve, tmp_path, digits_replica):
    server = serve("--fault", "error503:2")
    c = client(server, tmp_path)
    x = images(5)
    np.testing.assert_allclose(c.logits(x), digits_replica.logits(x), atol=1e-4)
    assert c.n_queries == 1 and len(server.accepted_calls()) == 1


def test_persistent_5xx_fails_after_bounded_retries(serve, tmp_path):
    server = serve("--fault", "error500:20")
    c = client(server, tmp_path, retries=2)
    t0 = time.monotonic()
    with pytest.raises(ApiError, match="HTTP 500"):
        c.logits(images(3))
    assert time.monotonic() - t0 < 10
    assert [e["status"] for e in c.ledger.calls()] == ["failed"]
    assert c.ledger.spent("logits") == 0


@pytest.mark.parametrize("delay,timeout", [(1.0, 5.0), (2.5, 1.0)])
def test_slow_response(serve, tmp_path, digits_replica, delay, timeout):
    """Slower than usual but within the timeout: answered; beyond it: timed out, retried, answered."""
    server = serve("--fault", "slow:1", "--fault-delay", str(delay))
    c = client(server, tmp_path, timeout=timeout)
    x = images(4)
    np.testing.assert_allclose(c.logits(x), digits_replica.logits(x), atol=1e-4)
    assert c.n_queries == 1


def test_connection_refused_then_server_comes_up(serve, tmp_path, digits_replica):
    server = serve(start=False)
    c = client(server, tmp_path, retries=6, backoff=0.5)
    starter = threading.Timer(2.0, server.start, kwargs={"wait": False})
    starter.start()
    try:
        x = images(3)
        np.testing.assert_allclose(c.logits(x), digits_replica.logits(x), atol=1e-4)
    finally:
        starter.join()


@pytest.mark.parametrize("fault,message", [("malformed", "malformed response"), ("wrong_count", "returned 2 results")])
def test_bad_responses_are_clear_errors_and_never_cached(serve, tmp_path, fault, message):
    server = serve("--fault", f"{fault}:1")
    c = client(server, tmp_path)
    x = images(3)
    with pytest.raises(ApiError, match=message):
        c.logits(x)
    assert c.ledger.lookup_logits(batch_sha256(x)) is None
    assert list((c.ledger.root / "logits").iterdir()) == []
    assert c.logits(x).shape == (3, 10)  # the next call is a real one and succeeds


def test_other_4xx_fail_at_once_with_the_servers_message(serve, tmp_path):
    server = serve()
    bad = ChallengeClient(server.url, "12-data-reconstruction", "wrong-key", ledger=Ledger(tmp_path / "l"))
    with pytest.raises(ApiError, match="HTTP 401.*Invalid or missing API key") as exc:
        bad.logits(images(2))
    assert "wrong-key" not in str(exc.value)
    too_many = client(server, tmp_path)
    with pytest.raises(ApiError, match="HTTP 400"):
        too_many._post("/12-data-reconstruction/logits", "npz", "x.npz", b"not an npz", "logits")


def test_budget_stops_a_call_before_it_is_sent(serve, tmp_path):
    server = serve()
    c = client(server, tmp_path, max_logits_calls=1)
    c.logits(images(2, 0))
    with pytest.raises(BudgetExceeded, match="1 of 1 logits calls already spent.*nothing was sent"):
        c.logits(images(2, 1))
    assert len(server.accepted_calls()) == 1
    assert c.logits(images(2, 0)).shape == (2, 10)  # a cached repeat costs nothing


def test_budget_holds_across_processes(serve, tmp_path):
    server = serve()
    code = (
        "import sys, numpy as np\n"
        "from recon.client import ChallengeClient\nfrom recon.ledger import Ledger, BudgetExceeded\n"
        f"c = ChallengeClient('{server.url}', '12-data-reconstruction', '{KEY}',"
        f" ledger=Ledger(r'{tmp_path / 'ledger'}', max_logits_calls=2))\n"
        "try:\n    c.logits(np.random.default_rng(int(sys.argv[1])).random((2, 3, 32, 32), dtype=np.float32))\n"
        "    print('sent')\nexcept BudgetExceeded:\n    print('refused')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["refused", "refused", "sent", "sent"]
    assert len(server.accepted_calls()) == 2


def test_submit_keeps_the_response_with_the_file_sha(serve, tmp_path, digits_replica):
    server = serve()
    c = client(server, tmp_path, max_submissions=1)
    path = write_submission(tmp_path / "sub.npz", digits_replica.targets.images)
    response = c.submit(path)
    assert response["score"] == pytest.approx(0.0, abs=1e-6) and response["submission_id"]
    (rec,) = [e for e in c.ledger.calls() if e["kind"] == "submit"]
    import hashlib

    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["submission_id"] == response["submission_id"]
    with pytest.raises(BudgetExceeded, match="submissions"):
        c.submit(path)


def test_probe_finds_the_servers_convention(serve, tmp_path, digits_replica):
    server = serve("--input-convention", "x255")
    c = client(server, tmp_path)
    result = probe_conventions(digits_replica.aux.images, digits_replica.aux.labels, c)
    assert c.n_queries == 1 and c.n_images == 100
    assert result["best"] == "x255"
    assert result["agreement"]["x255"] > 0.6 and result["agreement"]["raw"] < result["agreement"]["x255"]


def test_cli_tools(serve, tmp_path, digits_replica, capsys, monkeypatch):
    server = serve("--input-convention", "channels_last")
    monkeypatch.setenv("RECON_API_KEY", KEY)
    ov = ["challenge=replica_server", f"challenge.base_url={server.url}", f"paths.state={tmp_path}",
          f"challenge.aux_path={digits_replica.root / 'auxiliary_dataset.pt'}"]
    from recon.api_cli import probe_main

    assert probe_main(ov) == 0
    assert '"best": "channels_last"' in capsys.readouterr().out
    path = write_submission(tmp_path / "sub.npz", digits_replica.targets.images)
    assert submit_main([str(path), *ov]) == 0
    assert '"submission_id"' in capsys.readouterr().out
    assert ledger_main(ov) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "submit" in out and "probed input convention: channels_last" in out
    assert KEY not in out
    assert submit_main([str(tmp_path / "missing.npz"), *ov]) == 2
    assert ledger_main(["challenge=remote"]) == 2  # base_url not set: a clear error, not a traceback
    assert "challenge.base_url is not set" in capsys.readouterr().err


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("RECON_API_KEY", raising=False)
    with pytest.raises(ApiError, match="no API key"):
        load_api_key(None, None)
    f = tmp_path / "key"
    f.write_text("sk-from-file\n")
    assert load_api_key(None, f) == "sk-from-file"
    monkeypatch.setenv("RECON_API_KEY", "sk-env")
    assert load_api_key(None, None) == "sk-env"
    assert load_api_key("sk-cfg", f) == "sk-cfg"
