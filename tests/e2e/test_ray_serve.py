"""`serve --ray --replicas 2` on the demo model: a local Ray cluster started by the command, Ray Serve's proxy on
a loopback port; the official openai client gets `ask`'s answer, streamed too, 16 concurrent requests are all
answered right, the plain server's limits and API key hold through it; on SIGTERM the command exits 0 and no
process it started (Ray's included) is left."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from support.serving import free_port

from convllava_edge.cli.main import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes-1.png"
QUESTION = "How many shapes are there?"
KEY = "k-ray-test"


def message(question: str = QUESTION) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-serve")
    port = free_port()
    log = tmp / "serve.log"
    env = {**os.environ, "CONVLLAVA_EDGE_CACHE": str(tmp / "cache"), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "convllava_edge.cli.main", "serve", "--ray", "--replicas", "2",
                             "--port", str(port), "--api-key", KEY, "--max-image-bytes", "100000"],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while "serving the demo model on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # only if the test did not stop it
            proc.wait(30)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.timeout(600)
def test_replicas_answer_like_ask_and_stop_cleanly(ray_server, capsys):
    import openai

    proc, url, log = ray_server
    capsys.readouterr()
    assert main(["ask", str(EXAMPLE), QUESTION, "--temperature", "0", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["answer"]
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, messages=message(), temperature=0, max_tokens=16)
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(model=model, messages=message(), temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

    def one(_):
        return client.chat.completions.create(model=model, messages=message(), temperature=0,
                                              max_tokens=16).choices[0].message.content
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [expected] * 16

    # the plain server's guarantees, through Ray Serve's proxy
    body = {"model": model, "messages": message(), "max_tokens": 4}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    big = {**body, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200_000}}, {"type": "text", "text": "?"}]}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 0},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    # the Host and Origin rules (serve/guard.py), through the proxy too
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(url + "/v1/models", headers={**auth, "Host": "rebind.evil.example"}, timeout=60)
    assert r.status_code == 403 and "does not name this server" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(body),
                   headers={**auth, "Origin": "http://evil.example", "Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 403 and "not this server's own" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/models", headers={**auth, "Origin": url}, timeout=60).status_code == 200

    started = descendants(proc.pid)
    assert len(started) >= 3, started  # Ray's processes (GCS, raylet, workers: the replicas among them)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:  # never leave them behind, even when the test fails
        p.kill()
    assert not left, [p.pid for p in left]


@pytest.mark.timeout(60)
def test_bad_options_fail_in_one_line_before_ray_starts(tmp_path, capsys):
    for args, fragment in ((["--model", str(tmp_path / "nope")], "nope"), (["--replicas", "2"], "add --ray")):
        assert main(["serve", *(["--ray"] if "--model" in args else []), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    import ray

    assert not ray.is_initialized()
