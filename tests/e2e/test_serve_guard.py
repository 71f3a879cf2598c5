"""serve's Host and Origin rules over raw HTTP (http.client, so that every header is the test's own): a web page may
not drive the local server, a rebound name cannot read it, and the page at / and header-less clients keep working.
Two real servers on loopback (the default rules; one with --allowed-hosts and --allowed-origins), each stopped by
its PID. The non-loopback bind's rules are tested without binding one: tests/unit/test_serve_guard_rules.py."""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path

import pytest
from support.serving import Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
CHAT = {"model": "shapes-demo", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()}},
            {"type": "text", "text": "How many shapes are there?"}]}]}
APP = "http://app.example:3000"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("guard"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def allowing(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("guard-allow"), "--allowed-hosts", "box.lan,other.lan",
               "--allowed-origins", APP)
    yield s
    s.stop()


def request(server, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
    """(status, headers, body) of one request with exactly these headers (Host included: none is added)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def own(server) -> str:
    return f"127.0.0.1:{server.port}"


def test_a_cross_origin_text_plain_post_is_refused(plain):
    # what any page the user visits can send without a preflight: a "simple request"
    status, _, body = request(plain, "POST", "/v1/chat/completions",
                              {"Host": own(plain), "Origin": "http://evil.example", "Content-Type": "text/plain"},
                              json.dumps(CHAT).encode())
    assert status == 403 and "not this server's own" in json.loads(body)["error"]["message"]
    status, _, body = request(plain, "POST", "/api/generate",
                              {"Host": own(plain), "Origin": "null", "Content-Type": "text/plain"},
                              json.dumps({"model": "shapes-demo", "prompt": "hi", "stream": False}).encode())
    assert status == 403 and isinstance(json.loads(body)["error"], str)  # Ollama's shape


def test_a_rebound_host_is_refused_on_every_route(plain):
    for method, path in (("GET", "/health"), ("GET", "/"), ("GET", "/v1/models"), ("GET", "/api/tags"),
                         ("POST", "/v1/chat/completions")):
        status, _, body = request(plain, method, path, {"Host": f"rebind.evil.example:{plain.port}"},
                                  json.dumps(CHAT).encode() if method == "POST" else None)
        assert status == 403, (path, status)
        assert b"does not name this server" in body


def test_local_names_and_clients_without_origin_are_answered(plain):
    for host in (own(plain), f"localhost:{plain.port}", f"[::1]:{plain.port}", "localhost"):
        assert request(plain, "GET", "/health", {"Host": host})[0] == 200, host
    status, _, body = request(plain, "POST", "/v1/chat/completions",
                              {"Host": own(plain), "Content-Type": "application/json"}, json.dumps(CHAT).encode())
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


def test_the_page_and_its_own_origin_keep_working(plain):
    status, _, body = request(plain, "GET", "/", {"Host": own(plain)})
    assert status == 200 and b"<html" in body.lower()
    status, _, body = request(plain, "POST", "/v1/chat/completions",
                              {"Host": own(plain), "Origin": f"http://{own(plain)}", "Content-Type": "application/json"},
                              json.dumps(CHAT).encode())
    assert status == 200 and json.loads(body)["object"] == "chat.completion"


def test_allowed_hosts_and_origins(allowing):
    port = allowing.port
    assert request(allowing, "GET", "/health", {"Host": f"box.lan:{port}"})[0] == 200
    assert request(allowing, "GET", "/health", {"Host": "other.lan"})[0] == 200
    assert request(allowing, "GET", "/health", {"Host": f"third.lan:{port}"})[0] == 403
    # the allowed page: its preflight answered, its request answered with CORS headers
    status, headers, _ = request(allowing, "OPTIONS", "/v1/chat/completions",
                                 {"Host": own(allowing), "Origin": APP, "Access-Control-Request-Method": "POST",
                                  "Access-Control-Request-Headers": "content-type,authorization"})
    assert status == 200 and headers["access-control-allow-origin"] == APP
    status, headers, body = request(allowing, "POST", "/v1/chat/completions",
                                    {"Host": own(allowing), "Origin": APP, "Content-Type": "application/json"},
                                    json.dumps(CHAT).encode())
    assert status == 200 and headers["access-control-allow-origin"] == APP
    # another page still refused, preflight included
    for method in ("OPTIONS", "POST"):
        status, headers, _ = request(allowing, method, "/v1/chat/completions",
                                     {"Host": own(allowing), "Origin": "http://evil.example",
                                      "Access-Control-Request-Method": "POST"}, b"{}" if method == "POST" else None)
        assert status == 403 and "access-control-allow-origin" not in headers
