"""serve's Host and Origin checks (convllava_edge/serve/guard.py) without a server: the policy's verdicts for each
kind of bind and header, and the ASGI middleware driven directly (it needs no web framework). The same rules over
raw HTTP against a real server: tests/e2e/test_serve_guard.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from convllava_edge.serve.guard import HostOriginGuard, Policy, is_loopback, parse_list
from convllava_edge.serve.options import ServeOptions

LOCAL = Policy("127.0.0.1")


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "127.0.0.1", "localhost:8765", "LOCALHOST", "[::1]:8765",
                                  "[::1]", "localhost:9000"])
def test_names_of_a_loopback_server_are_accepted(host):
    assert LOCAL.refusal(host, None) is None


@pytest.mark.parametrize("host", ["evil.example:8765", "evil.example", "127.0.0.1.evil.example", "localhost.",
                                  "10.0.0.5:8765", "[::2]:8765", "", "localhost:8765:1"])
def test_a_rebound_or_foreign_host_is_refused_on_loopback(host):
    assert "does not name this server" in LOCAL.refusal(host, None)


def test_a_missing_host_is_refused_where_the_host_is_checked():
    assert LOCAL.refusal(None, None) == "a Host header is needed"


def test_allowed_hosts_add_names_and_star_turns_the_check_off():
    policy = Policy("127.0.0.1", ("myhost.lan", "Box:8080"))
    assert policy.refusal("myhost.lan:8765", None) is None and policy.refusal("box", None) is None
    assert policy.refusal("localhost:1", None) is None  # the local names stay
    assert policy.refusal("other.lan", None) is not None
    star = Policy("127.0.0.1", ("*",))
    assert star.refusal("anything.example", None) is None and star.refusal(None, None) is None
    assert any("Host check is off" in line for line in star.describe())


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.5", "my-machine.lan"])
def test_on_a_non_loopback_bind_the_host_check_is_off_unless_asked_for_and_start_up_says_so(bind):
    policy = Policy(bind)
    assert policy.refusal("192.168.1.5:8765", None) is None and policy.refusal("whatever.lan", None) is None
    assert any(f"bound to {bind}" in line for line in policy.describe())
    asked = Policy(bind, ("server.lan",))
    assert asked.refusal("server.lan:8765", None) is None and asked.refusal("whatever.lan", None) is not None
    assert asked.describe() == []


def test_the_bound_address_names_the_server():
    assert Policy("127.0.0.2").refusal("127.0.0.2:8765", None) is None
    assert Policy("::1").refusal("[::1]:1", None) is None
    assert Policy("0.0.0.0", ("x",)).refusal("0.0.0.0:1", None) is None


def test_loopback_binds():
    assert all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "example.com"]))


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8765", "https://127.0.0.1:8765", "HTTP://127.0.0.1:8765/"])
def test_the_servers_own_origin_is_accepted(origin):
    assert LOCAL.refusal("127.0.0.1:8765", origin) is None


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:9999", "http://localhost:8765",
                                    "file://"])
def test_any_other_origin_is_refused(origin):
    # localhost:8765 is another origin than 127.0.0.1:8765 to a browser: a page there is not the server's page
    assert "is not this server's own" in LOCAL.refusal("127.0.0.1:8765", origin)


def test_a_foreign_origin_is_refused_even_where_the_host_check_is_off():
    # the cross-origin text/plain POST: the one check that stops it on a LAN bind
    assert Policy("0.0.0.0").refusal("192.168.1.5:8765", "http://evil.example") is not None
    assert Policy("127.0.0.1", ("*",)).refusal("x:1", "http://evil.example") is not None


def test_allowed_origins():
    policy = Policy("127.0.0.1", None, ("http://app.example:3000", "HTTPS://Other.Example/"))
    assert policy.refusal("127.0.0.1:8765", "http://app.example:3000") is None
    assert policy.refusal("127.0.0.1:8765", "https://other.example") is None
    assert policy.refusal("127.0.0.1:8765", "http://app.example:3001") is not None
    star = Policy("127.0.0.1", None, ("*",))
    assert star.refusal("127.0.0.1:8765", "http://anything.example") is None
    assert star.refusal("evil.example", "http://anything.example") is not None  # Host still checked
    assert any("any web page" in line for line in star.describe())


def test_lists_from_the_command_line():
    assert parse_list(None) is None and parse_list([]) is None
    assert parse_list(["a, b", "c", ","]) == ("a", "b", "c")


def test_serve_options_carry_the_policy():
    options = ServeOptions(bind_host="0.0.0.0", allowed_hosts=("a",), allowed_origins=("http://b",))
    assert options.policy == Policy("0.0.0.0", ("a",), ("http://b",))
    assert ServeOptions().policy == LOCAL  # app() built without options is loopback-safe


def call(policy: Policy, path: str, headers: dict[str, str]) -> tuple[int, dict | None, bool]:
    """(status, JSON body, whether the app behind was reached) for one request through the middleware."""
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]}
    asyncio.run(HostOriginGuard(inner, policy)(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body else None, bool(reached)


def test_the_middleware_refuses_before_the_app_in_each_routes_error_shape():
    status, body, reached = call(LOCAL, "/v1/chat/completions", {"Host": "evil.example:8765"})
    assert (status, reached) == (403, False)
    assert body["error"]["type"] == "permission_error" and "evil.example" in body["error"]["message"]
    status, body, reached = call(LOCAL, "/api/chat", {"Host": "127.0.0.1:8765", "Origin": "http://evil.example"})
    assert (status, reached) == (403, False) and isinstance(body["error"], str)  # Ollama's shape
    status, _, reached = call(LOCAL, "/api/chat", {"Host": "127.0.0.1:8765", "Origin": "http://127.0.0.1:8765"})
    assert (status, reached) == (200, True)


def test_the_middleware_passes_other_scopes():
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    asyncio.run(HostOriginGuard(inner, LOCAL)({"type": "lifespan"}, None, None))
    assert reached == ["lifespan"]
