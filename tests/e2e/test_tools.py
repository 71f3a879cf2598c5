"""Tool calls on the demo model (never trained on them: the generic format) through the official openai and ollama
clients against one `serve` process, and through Python's Chat: required, named and auto choices, streamed and not,
parallel calls, a two-step loop that reuses the conversation's KV state. Every call's arguments are validated
against its tool's parameters with jsonschema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ollama
import openai
import pytest
from support.serving import Server, image_messages, openai_client

from convllava_edge.backends.base import SamplingOptions
from convllava_edge.model import AskOptions, load

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
QUESTION = "How many red shapes are there?"
COUNT = {"type": "function", "function": {"name": "count_shapes", "description": "Count the shapes of one color",
                                          "parameters": {"type": "object", "properties": {
                                              "color": {"enum": ["red", "green", "blue", "yellow"]}},
                                              "required": ["color"]}}}
DESCRIBE = {"type": "function", "function": {"name": "describe", "description": "Describe a shape",
                                             "parameters": {"type": "object", "properties": {
                                                 "shape": {"enum": ["circle", "square", "triangle"]}},
                                                 "required": ["shape"]}}}
TOOLS = [COUNT, DESCRIBE]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def validate(name: str, arguments: str | dict) -> None:
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, PARAMETERS[name])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-tools"), "--max-tokens-cap", "256")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _messages() -> list[dict]:
    return image_messages(EXAMPLE, QUESTION)


def _create(client, **kwargs):
    return client.chat.completions.create(model="shapes-demo", messages=kwargs.pop("messages", _messages()),
                                          temperature=0, tools=TOOLS, **kwargs)


def test_a_required_call_streamed_and_not(client):
    r = _create(client, tool_choice="required", parallel_tool_calls=False, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    validate(call.function.name, call.function.arguments)
    parts = list(_create(client, tool_choice="required", parallel_tool_calls=False, max_tokens=64, stream=True))
    deltas = [tc for p in parts if p.choices and p.choices[0].delta.tool_calls for tc in p.choices[0].delta.tool_calls]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert parts[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_call_is_that_function(client):
    r = _create(client, tool_choice={"type": "function", "function": {"name": "describe"}}, max_tokens=64)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "describe"
    validate("describe", call.function.arguments)


def test_auto_returns_either_shape_consistently(client):
    r = _create(client, tool_choice="auto", max_tokens=48)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            validate(call.function.name, call.function.arguments)
    else:  # the demo model answers directly: its text is the content, never the JSON wrapper (even cut)
        assert isinstance(choice.message.content, str) and not choice.message.content.startswith('{"response"')
        assert choice.finish_reason in ("stop", "length")
    none = _create(client, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_parallel_calls(client):
    r = _create(client, tool_choice="required", max_tokens=256)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) >= 2, r.choices[0]
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        validate(call.function.name, call.function.arguments)


def test_a_two_step_loop_reuses_the_kv_state(client):
    messages = _messages()
    first = _create(client, messages=messages, tool_choice="required", parallel_tool_calls=False, max_tokens=64)
    (call,) = first.choices[0].message.tool_calls
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "2"}]
    second = _create(client, messages=messages, tool_choice="auto", max_tokens=48)
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens - 10
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    message = second.choices[0].message
    assert message.tool_calls or message.content is not None


def test_bad_tools_are_400_before_any_stream(client):
    cases = [
        ({"tools": [COUNT, COUNT]}, "offered twice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "paint"}}}, "not in tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}}}]}, "maximum"),
        ({"tools": TOOLS, "extra": [{"role": "tool", "tool_call_id": "call_nope", "content": "1"}]},
         "answers no earlier tool call"),
    ]
    for kwargs, needle in cases:
        extra = kwargs.get("extra", [])
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="shapes-demo", messages=_messages() + extra, max_tokens=8,
                                               stream=stream, **{k: v for k, v in kwargs.items() if k != "extra"})
            assert needle in e.value.message, e.value.message


def test_ollama_tools_and_results(server):
    # Ollama has no tool_choice: "auto" always; the demo model may answer or call
    c = ollama.Client(host=server.url, timeout=60)
    message = {"role": "user", "content": QUESTION, "images": [EXAMPLE.read_bytes()]}
    r = c.chat(model="shapes-demo", messages=[message], tools=TOOLS, options={"temperature": 0, "num_predict": 200},
               stream=False)
    if r.message.tool_calls:
        for call in r.message.tool_calls:
            validate(call.function.name, dict(call.function.arguments))
    else:
        assert isinstance(r.message.content, str) and not r.message.content.startswith('{"response"')
    parts = list(c.chat(model="shapes-demo", messages=[message], tools=TOOLS, stream=True,
                        options={"temperature": 0, "num_predict": 200}))
    streamed = [call for p in parts for call in (p.message.tool_calls or [])]
    assert [(x.function.name, dict(x.function.arguments)) for x in streamed] == \
        [(x.function.name, dict(x.function.arguments)) for x in (r.message.tool_calls or [])]
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done
    called = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "count_shapes",
                                                                             "arguments": {"color": "red"}}}]}
    follow = c.chat(model="shapes-demo", tools=TOOLS, options={"temperature": 0, "num_predict": 48}, stream=False,
                    messages=[message, called, {"role": "tool", "content": "2", "tool_name": "count_shapes"}])
    assert follow.done and (follow.message.tool_calls or follow.message.content is not None)
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="shapes-demo", tools=TOOLS, messages=[message, {"role": "tool", "content": "2"}])
    assert e.value.status_code == 400 and "answers no earlier tool call" in e.value.error


def test_python_chat_calls_and_results():
    model = load(cache=False)
    try:
        chat = model.chat(EXAMPLE, AskOptions(max_tokens=64, sampling=SamplingOptions(temperature=0)))
        a = chat.ask(QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "count_shapes"}})
        (call,) = a.tool_calls
        assert call.name == "count_shapes" and a.stop_reason == "eos"
        validate("count_shapes", call.arguments)
        b = chat.send_tool_results([(call, "2")])
        # the first prompt's positions come from the KV cache (the answer is tokenized again from its text)
        assert b.n_evaluated <= b.n_prompt_positions - a.n_prompt_positions
        assert b.tool_answer is not None and len(chat.turns) == 2
        with pytest.raises(Exception, match="both constrain"):
            chat.ask(QUESTION, schema={"type": "object"})
    finally:
        model.close()
