"""`convllava-edge serve`: real server processes on free loopback ports, the official `openai` client and raw
HTTP. Every process started here is stopped by its PID; every request goes to 127.0.0.1, bounded in count and
time (pytest-timeout bounds each test)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.serving import Server

import convllava_edge

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
KEY = "test-key-123"
QUESTION = "How many shapes are there?"
DEMO = "shapes-demo"


def data_url(path: Path = EXAMPLE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(question: str = QUESTION, url: str | None = None) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url()}},
                                        {"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--parallel", "2", "--queue", "4",
               "--max-image-bytes", "2000000", "--max-tokens-cap", "64", "--media-dir", str(ROOT / "examples"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def cli_answer(tmp_path_factory):
    env = {**os.environ, "CONVLLAVA_EDGE_CACHE": str(tmp_path_factory.mktemp("ask-cache"))}
    out = subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", "ask", str(EXAMPLE), QUESTION,
                          "--temperature", "0", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def post(server, body: dict | bytes, key: str | None = KEY, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def test_openai_client_answers_exactly_as_ask(client, cli_answer):
    r = client.chat.completions.create(model=DEMO, messages=[image_message()], temperature=0)
    assert r.object == "chat.completion" and r.model == DEMO and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == cli_answer["answer"]
    assert r.model_extra["token_ids"] == cli_answer["token_ids"]
    assert r.usage.prompt_tokens == cli_answer["n_prompt_positions"]
    assert r.usage.completion_tokens == len(cli_answer["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.image_tokens == cli_answer["n_image_tokens"]
    assert set(r.model_extra["timings"]) >= {"preprocess_ms", "encode_ms", "prefill_ms", "time_to_first_token_ms"}


def test_streamed_answer_is_the_same_and_ends_with_usage(client, cli_answer):
    stream = client.chat.completions.create(model=DEMO, messages=[image_message()], temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == cli_answer["answer"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(cli_answer["token_ids"])
    assert len({c.id for c in chunks}) == 1


def test_a_second_turn_reuses_the_kv_state(client):
    first = client.chat.completions.create(model=DEMO, messages=[image_message()], temperature=0)
    history = [image_message(), {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "What color is the triangle?"}]
    second = client.chat.completions.create(model=DEMO, messages=history, temperature=0)
    details = second.usage.prompt_tokens_details
    assert details.cached_tokens > first.usage.prompt_tokens - 5  # the first turn's positions, from the slot
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_text_only_and_system_and_stop(client):
    r = client.chat.completions.create(model=DEMO, messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hello?"}],
                                       temperature=0, max_tokens=4)
    assert r.usage.prompt_tokens_details.image_tokens == 0 and r.usage.completion_tokens <= 4
    assert r.choices[0].finish_reason in ("stop", "length")


def test_file_urls_inside_the_media_folder_only(server, client, tmp_path):
    r = client.chat.completions.create(model=DEMO, messages=[image_message(url=EXAMPLE.as_uri())], temperature=0)
    assert r.usage.prompt_tokens_details.image_tokens > 0
    outside = tmp_path / "x.png"
    outside.write_bytes(EXAMPLE.read_bytes())
    resp = post(server, {"messages": [image_message(url=outside.as_uri())]})
    assert resp.status_code == 400 and "not a file inside the media folder" in resp.json()["error"]["message"]


def test_sse_framing(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [image_message()], "stream": True, "temperature": 0}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e
        json.loads(e[len("data: "):])


def test_models_health_auth_and_unknown_model(server):
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}  # no key needed
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    (m,) = models["data"]
    assert m["id"] == DEMO and m["family"] == "convllava" and m["image_tokens"]["square"] == 36 and m["context"] > 0
    cores = len(os.sched_getaffinity(0))  # --parallel 2: each slot decodes on its half, prefill takes every core
    assert m["parallel"] == 2 and m["threads"] == {"decode_per_slot": max(1, cores // 2), "batch": cores}
    resp = post(server, {"model": "nope", "messages": [image_message()]})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert post(server, {"messages": [image_message()]}, key=None).status_code == 401


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": [image_message(url="https://example.com/a.png")]}, 400, "does not fetch images"),
    ({"messages": [image_message(url="data:image/png;base64,@@@")]}, 400, "base64 is malformed"),
    ({"messages": [image_message(url="data:image/png;base64," + base64.b64encode(b"not an image").decode())]}, 400,
     "image"),
    ({"messages": [image_message()] * 9}, 400, "9 images in one request, more than the 8 this server takes"),
    ({"messages": [image_message()], "max_tokens": 65}, 400, "over this server's cap"),
    ({"messages": [image_message()], "max_tokens": "3"}, 400, "max_tokens must be an integer"),
    ({"messages": [image_message()], "temperature": "hot"}, 400, "temperature must be a finite number"),
    ({"messages": [image_message()], "n": 2}, 400, "n=1"),
    ({"messages": "hi"}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "start and end with a user message"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context"),
])
def test_bad_input_is_one_error_object_and_the_server_stays_up(server, body, status, needle):
    resp = post(server, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert post(server, {"messages": [image_message()], "temperature": 0}).status_code == 200


def test_oversized_bodies_and_images_are_413(server):
    big = data_url().split(",")[0] + "," + base64.b64encode(b"\0" * 2_100_000).decode()
    resp = post(server, {"messages": [image_message(url=big)]})
    assert resp.status_code == 413 and "--max-image-bytes" in resp.json()["error"]["message"]
    # the body may hold --max-images (8) images of --max-image-bytes each, base64, and the text: 25.3 MB here
    resp = post(server, b'{"messages": "' + b"x" * 26_000_000 + b'"}')
    assert resp.status_code == 413
    assert post(server, b"{not json").status_code == 400


def test_unknown_fields_are_ignored(server):
    resp = post(server, {"messages": [image_message()], "temperature": 0, "logit_bias": {}, "user": "u",
                         "future_field": {"a": 1}})
    assert resp.status_code == 200


def ask_once(url: str, i: int) -> tuple[int, str | None, float]:
    t = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"messages": [image_message()], "temperature": 0, "max_tokens": 8})
    content = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
    return r.status_code, content, time.monotonic() - t


def test_a_burst_of_16_gets_answers_or_immediate_503s_and_memory_comes_back(server, cli_answer):
    ask_once(server.url, -1)
    before = server.rss()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: ask_once(server.url, i), range(16)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 6  # 2 running + 4 queued at least
    assert all(text == cli_answer["answer"] for c, text, _ in results if c == 200)
    assert all(seconds < 5 for c, _, seconds in results if c == 503)  # refused at once, not after a wait
    assert ask_once(server.url, 99)[:2] == (200, cli_answer["answer"])
    assert server.rss() < before * 1.10


def test_a_client_gone_mid_stream_frees_its_slot(tmp_path):
    s = Server(tmp_path, "--parallel", "1", "--queue", "0", "--max-tokens-cap", "4096")
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
                                "temperature": 1.5, "max_tokens": 1500, "seed": 1}) as r:
            seen = [line for _, line in zip(range(6), r.iter_lines()) if line]
            assert len(seen) == 3 and "[DONE]" not in seen[-1]  # the generation is running; then the client goes
        time.sleep(0.5)
        code, text, _ = ask_once_plain(s.url)
        assert code == 200  # with one slot and no queue, this would be 503 if the slot were still busy
    finally:
        assert s.stop() == 0


def ask_once_plain(url: str):
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"messages": [image_message()], "temperature": 0})
    return r.status_code, r.text, 0.0


def test_request_time_limit_is_a_504(tmp_path):
    s = Server(tmp_path, "--request-timeout", "0.002", "--max-tokens-cap", "4096")  # less than a prefill
    try:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 1.5,
                             "max_tokens": 1500, "seed": 1})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
                                "temperature": 1.5, "max_tokens": 1500, "seed": 1}) as r:
            raw = r.read().decode()
        # past the limit before the stream opened (the prefill, usually): the status; after: an error event
        if r.status_code == 504:
            assert json.loads(raw)["error"]["code"] == "timeout"
        else:
            assert r.status_code == 200 and '"code": "timeout"' in raw, (r.status_code, raw)
    finally:
        assert s.stop() == 0


def test_sigterm_during_a_stream_exits_0_within_the_grace_period(tmp_path):
    s = Server(tmp_path, "--grace", "3", "--max-tokens-cap", "4096")
    with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
                            "temperature": 1.5, "max_tokens": 1500, "seed": 1}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has started
        t = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        try:
            for _ in lines:
                pass
        except httpx.HTTPError:
            pass
    assert s.proc.wait(20) == 0 and time.monotonic() - t < 3 + 5
    s.stop()


# -- Ollama's API ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ollama_client(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_ollama_chat_streamed_and_not_gives_the_answer_of_ask(server, ollama_client, cli_answer):
    message = {"role": "user", "content": QUESTION, "images": [EXAMPLE.read_bytes()]}
    r = ollama_client.chat(model=DEMO, messages=[message], options={"temperature": 0}, stream=False)
    assert r.message.role == "assistant" and r.message.content == cli_answer["answer"] and r.done
    assert r.done_reason == "stop"
    raw = post(server, {"model": DEMO, "messages": [{**message, "images": [base64.b64encode(EXAMPLE.read_bytes()).decode()]}],
                        "options": {"temperature": 0}, "stream": False}, path="/api/chat").json()
    assert raw["token_ids"] == cli_answer["token_ids"]  # the extension field (the ollama client drops it)
    assert r.prompt_eval_count == cli_answer["n_prompt_positions"] and r.eval_count == len(cli_answer["token_ids"])
    assert r.total_duration > r.prompt_eval_duration > 0 and r.eval_duration >= 0  # nanoseconds
    assert r.total_duration < 60e9
    parts = list(ollama_client.chat(model=f"{DEMO}:latest", messages=[message], options={"temperature": 0},
                                    stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == r.eval_count
    assert "".join(p.message.content for p in parts).strip() == cli_answer["answer"]


def test_ollama_generate_tags_version_and_errors(server, ollama_client, cli_answer):
    r = ollama_client.generate(model=DEMO, prompt=QUESTION, images=[EXAMPLE.read_bytes()],
                               options={"temperature": 0, "num_predict": 8}, stream=False)
    assert r.response == cli_answer["answer"] and r.done
    (tag,) = ollama_client.list().models
    assert tag.model == f"{DEMO}:latest" and tag.details.family == "convllava" and tag.size > 0
    shown = ollama_client.show(DEMO)
    assert "vision" in shown.capabilities and shown.details.quantization_level == "Q4_K_M"
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=DEMO, messages=[{"role": "user", "content": "hi"}], stream=False,
                           options={"top_k": 40})
    assert e.value.status_code == 400 and "options.top_k" in e.value.error  # refused, not silently ignored
    assert httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json() == \
        {"version": convllava_edge.__version__}
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="nope", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert e.value.status_code == 404 and "not served here" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=DEMO, messages=[{"role": "user", "content": "hi", "images": [b"not an image"]}],
                           stream=False)
    assert e.value.status_code == 400 and "image" in e.value.error
    no_key = httpx.post(server.url + "/api/chat", json={"model": DEMO, "messages": []}, timeout=10)
    assert no_key.status_code == 401 and "API key" in no_key.json()["error"]


# -- /metrics --------------------------------------------------------------------------------------------
def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_move_with_requests(server):
    before = scrape(server)
    chat = ("convllava_edge_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    model = (("model", DEMO),)
    assert before[("convllava_edge_busy_slots", model)] == 0 and before[("convllava_edge_slots", model)] == 2
    assert before[("convllava_edge_queue_depth", model)] == 0
    for _ in range(2):
        assert post(server, {"messages": [image_message()], "temperature": 0, "max_tokens": 4}).status_code == 200
    assert post(server, {"messages": [image_message()], "n": 3}).status_code == 400
    after = scrape(server)
    assert after[chat] == before.get(chat, 0) + 2
    bad = ("convllava_edge_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "400")))
    assert after[bad] == before.get(bad, 0) + 1
    for name in ("convllava_edge_generated_tokens_total", "convllava_edge_prompt_tokens_total",
                 "convllava_edge_image_tokens_total", "convllava_edge_time_to_first_token_seconds_count"):
        assert after[(name, model)] > before.get((name, model), 0), name
    images = ("convllava_edge_image_tokens_total", model)
    assert after[images] - before.get(images, 0) == 2 * 36  # the demo: 384 px, 6 x 6 tokens an image
    assert ("convllava_edge_decode_tokens_per_second_bucket", (("le", "+Inf"), ("model", DEMO))) in after
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
