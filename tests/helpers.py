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
    """`recon-challenge serve` as a real subprocess on a loopback port; can be killed and restarted."""

    def __init__(self, replica_dir, key: str, *args: str, port: int | None = None):
        import socket

        self.replica_dir, self.key, self.args = replica_dir, key, list(args)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self, wait: bool = True) -> ReplicaServer:
        import os
        import subprocess
        import sys

        env = {**os.environ, "RECON_API_KEY": self.key}
        self.log = open(f"{self.replica_dir}.server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recon.challenge_cli", "serve", str(self.replica_dir), "--port", str(self.port),
             *self.args], env=env, stdout=self.log, stderr=subprocess.STDOUT,
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
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=10)
        if self.proc:
            self.log.close()

    def accepted_calls(self, endpoint: str = "logits") -> list[dict]:
        import json
        from pathlib import Path

        path = Path(self.replica_dir) / "calls.log.jsonl"
        if not path.is_file():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in lines if endpoint in r["endpoint"]]
