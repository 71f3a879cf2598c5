"""A `convllava-edge serve` child process on a free loopback port, for the e2e tests that talk to it over HTTP.
It is stopped by its PID (SIGTERM, then SIGKILL past 30 s); its log is kept beside the test's files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, seconds: float, interval: float = 0.3) -> None:
    """Until ``url``/health answers 200; an AssertionError with the log's tail if the process exits or the time
    runs out (the caller stops it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[:4]} exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise AssertionError(f"not healthy in {seconds:g} s: {log.read_text()[-3000:]}")


class Server:
    """`serve` with these arguments, healthy (or the test fails with its log) before the constructor returns."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "CONVLLAVA_EDGE_CACHE": str(tmp / "cache")}
        log = tmp / f"serve-{self.port}.log"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "convllava_edge.cli.main", "serve", "--port", str(self.port),
                                      *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.proc, self.url, log, 120)
        except AssertionError:
            self.stop()
            raise

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def openai_client(server: Server, key: str = "none"):
    """The official client on ``server``: no retries, a bounded timeout."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def image_messages(path: Path, question: str) -> list[dict]:
    """One user message: the image at ``path`` as a data: URL, then ``question``."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]
