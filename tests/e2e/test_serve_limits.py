"""What `serve` refuses and how, driven over HTTP against one real server on loopback, stopped by its PID: lone
surrogates and deep nesting are 400s naming the field, /api/show checks its name, a streamed request that fails
before its stream opens answers with its real status, a client that leaves mid-request is a counted disconnect,
not a traceback, and a half-sent request times out (--read-timeout). The server's log holds no traceback at the end."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.serving import Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
READ_TIMEOUT = 2.0  # --read-timeout here: short, so that the tests of it are quick
CTX = 128  # --ctx: a prompt over it is easy to write
IMAGE_URL = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
LONG = "Describe every shape you see, one by one. " * 40  # ~400 tokens: over the context


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-limits"), "--read-timeout", str(READ_TIMEOUT), "--ctx", str(CTX),
               "--max-tokens-cap", "16")
    yield s
    assert s.stop() == 0
    log = Path(s.log.name).read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def post(server, path: str, body: bytes | str, stream: bool = False) -> tuple[int, str, str]:
    """(status, content type, text) of a POST with this exact body."""
    data = body.encode() if isinstance(body, str) else body
    with httpx.stream("POST", server.url + path, content=data, timeout=60,
                      headers={"Content-Type": "application/json"}) as r:
        return r.status_code, r.headers.get("content-type", ""), r.read().decode()


def openai_error(text: str) -> dict:
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def ollama_error(text: str) -> str:
    body = json.loads(text)
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


# -- defect 7: a lone surrogate in any text field -------------------------------------------------------------
SURROGATE = "\ud800"  # json.dumps writes it as the escape \ud800, which json.loads turns back into it
OPENAI_TEXT_FIELDS = [
    ({"messages": [{"role": "user", "content": f"hi {SURROGATE}"}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": SURROGATE}, {"role": "user", "content": "hi"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SURROGATE},
                   {"role": "user", "content": "and?"}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [SURROGATE]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "user": SURROGATE}, "user"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("body,field", OPENAI_TEXT_FIELDS, ids=[f for _, f in OPENAI_TEXT_FIELDS])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, body, field, stream):
    status, kind, text = post(server, "/v1/chat/completions", json.dumps({**body, "stream": stream}))
    assert status == 400 and kind.startswith("application/json"), (status, text)
    error = openai_error(text)
    assert error["param"] == field and error["code"] == "invalid_text" and field in error["message"], error


OLLAMA_TEXT_FIELDS = [
    ("/api/chat", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    ("/api/chat", {"messages": [{"role": "system", "content": SURROGATE}, {"role": "user", "content": "hi"}]},
     "messages[0].content"),
    ("/api/generate", {"prompt": SURROGATE}, "prompt"),
    ("/api/generate", {"prompt": "hi", "system": SURROGATE}, "system"),
]


@pytest.mark.parametrize("path,body,field", OLLAMA_TEXT_FIELDS, ids=[f"{p}-{f}" for p, _, f in OLLAMA_TEXT_FIELDS])
def test_a_lone_surrogate_in_ollamas_fields_is_a_400_in_ollamas_shape(server, path, body, field):
    status, _, text = post(server, path, json.dumps(body))  # Ollama streams by default
    assert status == 400 and field in ollama_error(text), (status, text)


def test_a_key_that_is_not_text_is_a_400(server):
    status, _, text = post(server, "/v1/chat/completions",
                           json.dumps({"messages": [{"role": "user", "content": "hi"}], SURROGATE: 1}))
    assert status == 400 and "a key of the request body" in openai_error(text)["message"]


# -- defect 8: deeply nested JSON on every POST route -----------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/api/generate", "/api/show"])
@pytest.mark.parametrize("depth", [3000, 100], ids=["past-the-parser", "past-our-limit"])
def test_deep_nesting_is_a_400(server, path, depth):
    status, _, text = post(server, path, "[" * depth + "]" * depth)
    assert status == 400, (status, text)
    message = ollama_error(text) if path.startswith("/api/") else openai_error(text)["message"]
    assert "nested more than 64 levels" in message, message
    nested = {"messages": [{"role": "user", "content": "hi", "extra": json.loads("[" * 80 + "]" * 80)}],
              "prompt": "hi"}
    status, _, text = post(server, path, json.dumps(nested))
    assert status == 400 and "nested more than 64 levels" in text, (status, text)


# -- defect 10: /api/show with a name that is not a string ------------------------------------------------------
@pytest.mark.parametrize("body", ['{"model": {}}', '{"model": 5}', '{"name": ["x"]}', '{"model": null}', '[1]', '"x"'])
def test_api_show_checks_its_name_in_ollamas_shape(server, body):
    status, _, text = post(server, "/api/show", body)
    assert status == 400, (status, text)
    ollama_error(text)


def test_errors_under_api_are_ollamas_shape_whatever_raised_them(server):
    r = httpx.get(server.url + "/api/chat", timeout=30)  # the framework's 405
    assert r.status_code == 405 and set(r.json()) == {"error"}, r.text
    r = httpx.get(server.url + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


# -- defect 11: what fails before the first byte keeps its status -----------------------------------------------
def image_request(url: str = IMAGE_URL, question: str = "How many shapes?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": question}]}], "max_tokens": 4}


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()


@pytest.mark.parametrize("body,code", [(image_request(NOT_AN_IMAGE), "invalid_input"),
                                       (image_request(question=LONG), "context_length_exceeded")],
                         ids=["image-does-not-decode", "prompt-over-the-context"])
def test_a_streamed_request_that_fails_before_streaming_has_its_status(server, body, code):
    plain = post(server, "/v1/chat/completions", json.dumps(body))
    streamed = post(server, "/v1/chat/completions", json.dumps({**body, "stream": True}))
    for status, kind, text in (plain, streamed):
        assert status == 400 and kind.startswith("application/json"), (status, kind, text)
        assert openai_error(text)["code"] == code
    assert openai_error(plain[2])["message"] == openai_error(streamed[2])["message"]
    image = body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1]
    status, kind, text = post(server, "/api/generate", json.dumps(
        {"prompt": body["messages"][0]["content"][1]["text"], "images": [image]}))  # streamed: Ollama's default
    assert status == 400 and kind.startswith("application/json"), (status, kind, text)
    ollama_error(text)


def test_a_good_streamed_request_still_streams(server):
    status, kind, text = post(server, "/v1/chat/completions", json.dumps({**image_request(), "stream": True}))
    assert status == 200 and kind.startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


# -- defect 12: a client gone mid-request; a request that never finishes arriving -------------------------------
def counts(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def raw_socket(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT * 5)
    return s


def test_a_client_that_leaves_mid_body_is_a_disconnect_not_an_error(server):
    before = counts(server)
    for _ in range(3):
        with raw_socket(server) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 5000\r\n\r\n" + b'{"messages": [')
            time.sleep(0.2)  # the handler is reading the body
    time.sleep(0.5)
    after = counts(server)
    chat = ("endpoint", "/v1/chat/completions")
    disconnects = ("convllava_edge_client_disconnects_total", (chat,))
    assert after.get(disconnects, 0) - before.get(disconnects, 0) == 3, after
    errors = ("convllava_edge_requests_total", (chat, ("status", "500")))
    assert after.get(errors, 0) == before.get(errors, 0)
    closed = ("convllava_edge_requests_total", (chat, ("status", "499")))
    assert after.get(closed, 0) - before.get(closed, 0) == 3


def read_answer(s: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and the seconds that took."""
    t0, data = time.monotonic(), b""
    while True:
        part = s.recv(65536)
        if not part:
            return data, time.monotonic() - t0
        data += part


@pytest.mark.parametrize("sent", [b"POST /v1/chat/comp", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""],
                         ids=["half-a-request-line", "headers-without-their-end", "nothing"])
def test_a_half_sent_head_is_a_408_within_the_read_timeout(server, sent):
    with raw_socket(server) as s:
        s.sendall(sent)
        answer, seconds = read_answer(s)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert READ_TIMEOUT * 0.8 < seconds < READ_TIMEOUT + 3, seconds


def test_a_half_sent_body_is_a_408_within_the_read_timeout(server):
    with raw_socket(server) as s:
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n" + b'{"messages"')
        answer, seconds = read_answer(s)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"--read-timeout" in answer and seconds < READ_TIMEOUT + 3, (answer[-300:], seconds)


def test_a_slow_but_steady_client_is_not_cut_off(server):
    """The limit is per part of the body, not on the whole: a body trickling in faster than it is served."""
    body = json.dumps({"messages": [{"role": "user", "content": "How many shapes?"}], "max_tokens": 2}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        for i in range(0, len(body), len(body) // 3 + 1):
            conn.send(body[i:i + len(body) // 3 + 1])
            time.sleep(READ_TIMEOUT * 0.6)  # 3 x 0.6 = 1.8 timeouts in all
        r = conn.getresponse()
        assert r.status == 200, r.read()
    finally:
        conn.close()


def test_keep_alive_requests_on_one_connection_still_work(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for _ in range(3):
            conn.request("GET", "/health")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
            time.sleep(READ_TIMEOUT * 0.6)  # between requests the head timer is not running
    finally:
        conn.close()
