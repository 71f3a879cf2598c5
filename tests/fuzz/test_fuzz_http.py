"""The HTTP surface fuzzed from its own OpenAPI document: one real `serve` on a loopback port (the demo model, an
API key, a media folder, small caps), every route sent bodies generated from the schema /openapi.json publishes
(tests/support/http_bodies.py), valid bodies with one field replaced by arbitrary JSON, and raw bytes. Each request has
a valid Host, content type and key, so it reaches the parsers. No 500, no request that hangs, no traceback in the
server's log, most answers not 401/403, and a normal request answers as before afterwards. Derandomized; bounded in
count (EXAMPLES a route) and time (pytest-timeout, a client timeout per request); the server is stopped by its PID.
The status counts are printed and written to the test's folder (status-counts.json)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from support.serving import Server
from support.http_bodies import VALID, deep_json, from_schema, json_values, mutated

ROOT = Path(__file__).resolve().parents[2]
KEY = "fuzz-key"
EXAMPLES = 2000  # a route: 4 routes x 3 strategies x 2000, most a few ms each: ~1.5 min on the 2-core Xeon
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
GETS = ("/health", "/v1/models", "/api/tags", "/api/version", "/metrics", "/openapi.json", "/")
STATUSES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-http")
    s = Server(folder, "--api-key", KEY, "--max-tokens-cap", "8", "--max-image-bytes", "200000", "--queue", "8",
               "--media-dir", str(ROOT / "examples"), "--request-timeout", "20")
    s.folder = folder
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as client:
        yield client


@pytest.fixture(scope="module")
def document(http):
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def reference_answer(http):
    return answer(http)


def answer(http) -> str:
    body = {**VALID["/v1/chat/completions"], "stream": False, "temperature": 0, "max_tokens": 8}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def send(http, path: str, content: bytes) -> None:
    r = http.post(path, content=content)  # a hang is httpx.ReadTimeout: the test fails
    STATUSES[r.status_code] += 1
    assert r.status_code < 500 or r.status_code in (503, 504), (path, r.status_code, r.text[:300], content[:300])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        error = r.json()["error"]
        assert isinstance(error, str) if path.startswith("/api/") else isinstance(error.get("message"), str)


def request_schema(document: dict, path: str) -> dict:
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_the_document_describes_every_post_routes_body_and_errors(document):
    posts = {p for p, ops in document["paths"].items() if "post" in ops}
    assert posts == set(VALID)
    for path in posts:
        op = document["paths"][path]["post"]
        assert request_schema(document, path)["additionalProperties"] is True
        error = op["responses"]["400"]["content"]["application/json"]["schema"]
        assert error["properties"]["error"]["type" if path.startswith("/api/") else "properties"]


def test_the_document_is_behind_the_key(server):
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 401


@pytest.mark.parametrize("path", list(VALID))
def test_fuzz_bodies_from_the_schema(http, document, reference_answer, path):
    @SETTINGS
    @given(from_schema(request_schema(document, path)))
    def run(body):
        send(http, path, json.dumps(body).encode())

    run()


@pytest.mark.parametrize("path", list(VALID))
def test_fuzz_valid_bodies_with_one_field_replaced(http, reference_answer, path):
    @SETTINGS
    @given(mutated(path))
    def run(body):
        send(http, path, json.dumps(body).encode())

    run()


@pytest.mark.parametrize("path", list(VALID))
def test_fuzz_raw_bytes(http, reference_answer, path):
    @SETTINGS
    @given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()) | deep_json)
    def run(content):
        send(http, path, content)

    run()


def test_get_routes_with_arbitrary_queries(http):
    @settings(SETTINGS, max_examples=40)
    @given(st.sampled_from(GETS), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    def run(path, query):
        r = http.get(path, params=query)
        STATUSES[r.status_code] += 1
        assert r.status_code == 200, (path, r.status_code)

    run()


def test_after_the_fuzz(server, http, reference_answer):
    """Runs last in the module: the counts, the log, and a normal request answered as before."""
    total = sum(STATUSES.values())
    (server.folder / "status-counts.json").write_text(json.dumps(dict(sorted(STATUSES.items()))))
    print(f"\nstatus counts over {total} requests: {dict(sorted(STATUSES.items()))}")
    assert total >= 8 * EXAMPLES
    assert not any(status >= 500 and status not in (503, 504) for status in STATUSES)
    assert (STATUSES[401] + STATUSES[403]) / total < 0.05  # the requests got past the front door
    assert STATUSES[200] > 0 and sum(n for s, n in STATUSES.items() if 400 <= s < 500) > 0
    server.log.flush()
    log = Path(server.log.name).read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert answer(http) == reference_answer
