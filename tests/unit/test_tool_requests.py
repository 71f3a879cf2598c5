"""Tool calls without a model: the tools a request offers, its tool_choice, the generic format's prompt and
grammar, assistant tool_calls and tool results rendered back, and every bad input as a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from convllava_edge.serve import ollama as ollama_api
from convllava_edge.serve.wire import ApiError, parse_chat
from convllava_edge.tools import Tools, compact, render_calls

COUNT = {"type": "function", "function": {"name": "count_shapes", "description": "Count the shapes of one color",
                                          "parameters": {"type": "object", "properties": {
                                              "color": {"enum": ["red", "green", "blue", "yellow"]}},
                                              "required": ["color"]}}}
DESCRIBE = {"type": "function", "function": {"name": "describe", "parameters": {
    "type": "object", "properties": {"detail": {"type": "string", "maxLength": 20}}, "required": ["detail"]}}}
ASK = {"role": "user", "content": "How many red shapes are there?"}


def parse(**body) -> object:
    return parse_chat({"messages": [ASK], **body}, 1000, None)


def test_tools_choice_and_the_generic_prompt():
    chat = parse(tools=[COUNT, DESCRIBE])
    assert chat.tools.choice == "auto" and chat.tools.parallel and chat.tools.active
    prompt = chat.tools.system_prompt("SYSTEM.")
    assert prompt.startswith("SYSTEM.\n\nYou can call these tools.") and '"name":"count_shapes"' in prompt
    assert '{"tool_calls": [...]}' in prompt and '{"response": your answer}' in prompt
    assert parse(tools=[COUNT], parallel_tool_calls=False).tools.system_prompt("S").count("tool_calls") == 0
    assert not parse(tools=[COUNT], tool_choice="none").tools.active
    assert parse(tools=[COUNT], tool_choice="none").tools.system_prompt("S") == "S"
    named = parse(tools=[COUNT, DESCRIBE], tool_choice={"type": "function", "function": {"name": "describe"}}).tools
    assert named.choice == "describe" and '"count_shapes"' not in named.system_prompt("")


def test_the_grammar_allows_the_choices_shapes_only():
    auto = parse(tools=[COUNT, DESCRIBE]).tools.constraint().grammar
    assert '"\\"response\\""' in auto and '"\\"tool_calls\\""' in auto and 'space ::= ""' in auto
    required = parse(tools=[COUNT, DESCRIBE], tool_choice="required", parallel_tool_calls=False).tools.constraint()
    assert '"\\"response\\""' not in required.grammar and '"\\"tool_calls\\""' not in required.grammar
    named = parse(tools=[COUNT, DESCRIBE], tool_choice={"type": "function", "function": {"name": "count_shapes"}})
    assert '"\\"describe\\""' not in named.tools.constraint().grammar
    assert parse(tools=[COUNT], tool_choice="none").tools.constraint() is None
    assert compact('root ::= "{" space "}"\nspace ::= " "?') == 'root ::= "{" space "}"\nspace ::= ""'


def test_reading_an_answer():
    tools = Tools(parse(tools=[COUNT]).tools.tools)
    call = tools.read('{"tool_call":{"name":"count_shapes","arguments":{"color":"red"}}}')
    assert call.content is None and [(c.name, c.parsed_arguments()) for c in call.calls] == [("count_shapes", {"color": "red"})]
    assert call.calls[0].id.startswith("call_") and call.calls[0].arguments == '{"color":"red"}'
    two = tools.read('{"tool_calls":[{"name":"count_shapes","arguments":{"color":"red"}},'
                     '{"name":"count_shapes","arguments":{"color":"blue"}}]}')
    assert len(two.calls) == 2 and len({c.id for c in two.calls}) == 2
    assert tools.read('{"response":"three"}').content == "three"
    cut = tools.read('{"tool_call":{"name":"cou')
    assert not cut.complete and cut.calls == [] and cut.content == '{"tool_call":{"name":"cou'
    auto = Tools(tools.tools, "auto")
    assert auto.read('{"response":"two \\"big\\" sha').content == 'two "big" sha'
    assert auto.read('{"response":"caf\\u00e9 and \\u00').content == "café and "


def test_calls_and_results_sent_back_render_as_the_model_wrote_them():
    arguments = '{"color":"red"}'
    chat = parse_chat({"tools": [COUNT], "messages": [
        ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "count_shapes", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "2"}]}, 1000, None)
    (first, answered), (results, pending) = chat.turns
    assert answered == render_calls([("count_shapes", arguments)]) == \
        '{"tool_call":{"name":"count_shapes","arguments":{"color":"red"}}}'
    assert json.loads(results) == {"tool_response": {"name": "count_shapes", "content": "2"}} and pending is None
    assert render_calls([("a", "{}"), ("b", '{"x":1}')]) == '{"tool_calls":[{"name":"a","arguments":{}},{"name":"b","arguments":{"x":1}}]}'


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [COUNT, COUNT]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": "count"}, "tools"),
    ({"tools": [COUNT], "tool_choice": {"type": "function", "function": {"name": "paint"}}}, "tool_choice.function.name"),
    ({"tools": [COUNT], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [COUNT], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [COUNT], "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tools_are_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)


@pytest.mark.parametrize("messages, param", [
    ([ASK, {"role": "tool", "tool_call_id": "call_x", "content": "2"}], "messages[1].tool_call_id"),
    ([ASK, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "count_shapes", "arguments": "{no"}}]},
      {"role": "tool", "tool_call_id": "c", "content": "2"}], "messages[1].tool_calls[0].function.arguments"),
    ([ASK, {"role": "assistant", "tool_calls": []}, ASK], "messages[1].tool_calls"),
    ([ASK, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "count_shapes", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c", "content": 2}], "messages[2].content"),
])
def test_bad_tool_messages_are_a_400_naming_the_field(messages, param):
    with pytest.raises(ApiError) as e:
        parse_chat({"tools": [COUNT], "messages": messages}, 1000, None)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)


def test_ollama_tools_calls_and_results():
    chat = ollama_api.parse("chat", {"tools": [COUNT], "messages": [
        {"role": "user", "content": ASK["content"]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "count_shapes",
                                                                          "arguments": {"color": "red"}}}]},
        {"role": "tool", "content": "2", "tool_name": "count_shapes"}]}, 1000)
    assert chat.tools.active and chat.turns[0][1] == '{"tool_call":{"name":"count_shapes","arguments":{"color":"red"}}}'
    assert json.loads(chat.turns[1][0])["tool_response"] == {"name": "count_shapes", "content": "2"}
    with pytest.raises(ApiError) as e:
        ollama_api.parse("chat", {"tools": [COUNT], "messages": [
            {"role": "user", "content": "x"}, {"role": "tool", "content": "2", "tool_name": "count_shapes"}]}, 1000)
    assert e.value.status == 400 and "answers no earlier tool call" in e.value.message
