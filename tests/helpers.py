"""Small shared builders for tests (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np

from recon.dataset_io import Dataset


def tiny_pool(per_class: int = 12, classes: int = 10, seed: int = 0, size: int = 32) -> Dataset:
    """Seeded class-conditional blobs: each class has its own mean colour, so a CNN can learn it fast."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    means = rng.random((classes, 3, 1, 1))
    imgs = means[labels] + 0.15 * rng.standard_normal((len(labels), 3, size, size))
    return Dataset(np.clip(imgs, 0, 1).astype(np.float32), labels.astype(np.int64))


class ReplicaServer:
    """`recon-challenge serve` as a real subprocess on a loopback port; can be killed and restarted.

    `key=None` starts it with no `$RECON_API_KEY` (for `--keys-file` servers and the refusal test)."""

    def __init__(self, replica_dir, key: str | None, *args: str, port: int | None = None):
        import socket
        from pathlib import Path

        self.root, self.key, self.args = Path(replica_dir), key, list(args)
        self.replica_dir = self.root
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.output = self.root.parent / f"{self.root.name}.server-{port}.log"  # its stdout and stderr
        self.proc = None

    @property
    def call_log(self):
        return self.root / "calls.log.jsonl"

    def start(self, wait: bool = True) -> ReplicaServer:
        import os
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "RECON_API_KEY"}
        if self.key is not None:
            env["RECON_API_KEY"] = self.key
        with open(self.output, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "recon.challenge_cli", "serve", str(self.root), "--port", str(self.port),
                 *self.args], env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output.read_text()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output.read_text()}")

    def stop(self, kill: bool = False) -> None:
        import subprocess

        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def accepted_calls(self, endpoint: str = "logits") -> list[dict]:
        import json

        path = self.call_log
        if not path.is_file():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in lines if endpoint in r["endpoint"]]
