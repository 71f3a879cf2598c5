"""Structured answers on the demo model: JSON schemas, JSON objects and grammars through Python, the CLI and both
HTTP APIs (the official openai and ollama clients against one `serve` process), logprobs against llama.cpp's own
logits, and a property test over generated schemas. Every answer is validated with jsonschema. Also, with the
clients' own types: every request field of both APIs is implemented, without effect, or refused; pydantic's schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import hypothesis.strategies as st
import jsonschema
import numpy as np
import ollama
import ollama._types as ollama_types
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from openai.types.chat import completion_create_params
from support.serving import Server, image_messages, openai_client

from convllava_edge.backends.base import SamplingOptions
from convllava_edge.model import AskOptions, load
from convllava_edge.serve import ollama as ollama_api
from convllava_edge.serve.wire import OPENAI_IMPLEMENTED, OPENAI_NO_EFFECT, OPENAI_REFUSED
from convllava_edge.structured import from_gbnf, from_schema, json_object

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
QUESTION = "How many shapes are there?"
GREEDY = SamplingOptions(temperature=0)
COUNT = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}


class Answer(pydantic.BaseModel):
    count: int
    color: typing.Literal["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def model():
    m = load(cache=False)
    yield m
    m.close()


def log_softmax(logits: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    z = logits.astype(np.float64)
    if allowed is not None:
        z = np.where(allowed, z, -np.inf)
    top = z[np.isfinite(z)].max()
    return z - (top + np.log(np.exp(z[np.isfinite(z)] - top).sum()))


# -- Python -----------------------------------------------------------------------------------------------
def test_ask_with_a_pydantic_schema_gives_a_value_that_validates(model):
    a = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=48, sampling=GREEDY), schema=Answer)
    assert a.stop_reason == "eos", a.text
    jsonschema.validate(a.parsed, Answer.model_json_schema())
    assert Answer.model_validate(a.parsed).count == a.parsed["count"] and a.to_dict()["parsed"] == a.parsed


def test_chat_turns_take_their_own_constraint(model):
    chat = model.chat(EXAMPLE, AskOptions(max_tokens=32, sampling=GREEDY))
    free = chat.ask(QUESTION)
    assert free.constraint is None and free.parsed is None
    shaped = chat.ask("What color is it?", schema={"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]}}, "required": ["color"]})
    assert shaped.parsed["color"] in ("red", "green", "blue", "yellow", "purple", "orange")
    assert len(chat.turns) == 2


def test_a_grammar_of_the_callers_is_followed(model):
    a = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=8, sampling=SamplingOptions(temperature=1.0, seed=3)),
                  grammar='root ::= ("one" | "two" | "three" | "four") " shapes"')
    assert a.text in ("one shapes", "two shapes", "three shapes", "four shapes") and a.stop_reason == "eos"


def test_a_constrained_answer_cut_by_max_tokens_is_not_repaired(model):
    a = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=3, sampling=GREEDY), schema=COUNT)
    assert a.stop_reason == "length" and a.parsed is None and not a.text.endswith("}")


def test_unconstrained_greedy_answers_are_unchanged_by_asking_for_logprobs(model):
    plain = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=16, sampling=GREEDY))
    with_logprobs = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=16, sampling=GREEDY, logprobs=5))
    assert with_logprobs.token_ids == plain.token_ids and len(with_logprobs.logprobs) == len(plain.token_ids)


def test_a_grammar_llama_cpp_cannot_parse_is_its_message_before_any_answer(model):
    from convllava_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="Undefined rule identifier 'nope'"):
        model.ask(EXAMPLE, QUESTION, grammar="root ::= nope")


# -- logprobs against llama.cpp's logits --------------------------------------------------------------------
def _evaluated_logits(llm, prompt: list[int], answer: list[int]) -> np.ndarray:
    """llama.cpp's logits at each answer position: the prompt and the answer evaluated again, all logits kept."""
    llm.truncate(0)
    rows = llm.eval_tokens(prompt + answer[:-1], all_logits=True)
    return rows[len(prompt) - 1:]


@pytest.mark.parametrize("constrained", [False, True])
def test_logprobs_are_log_softmax_of_llama_cpp_logits(model, constrained):
    llm = model.llm
    prompt = llm.tokenize("USER: How many shapes are there? ASSISTANT:", add_bos=True)
    words = ("one", "two", "three")
    constraint = from_gbnf('root ::= ("one" | "two" | "three")') if constrained else None
    llm.truncate(0)
    llm.eval_tokens(prompt)
    steps = list(llm.generate(GREEDY, 6, constraint=constraint, logprobs=5))
    assert steps
    tokens = [s.token for s in steps]
    logits = _evaluated_logits(llm, prompt, tokens)
    text = b""
    for step, row in zip(steps, logits):
        allowed = None
        if constrained:  # the grammar's mask, worked out from the vocabulary: pieces that keep a word possible
            pieces = [llm.piece(t) for t in range(llm.n_vocab)]
            allowed = np.array([bool(p) and any(w.encode().startswith(text + p) for w in words) for p in pieces])
        ref = log_softmax(row, allowed)
        assert abs(step.logprob.logprob - ref[step.token]) <= 1e-4
        top = [t for t, _ in step.logprob.top]
        assert top[0] == step.token == int(np.argmax(ref))  # greedy: the most likely token
        assert [round(v, 4) for _, v in step.logprob.top] == sorted((round(v, 4) for _, v in step.logprob.top),
                                                                     reverse=True)
        np.testing.assert_allclose([v for _, v in step.logprob.top], ref[top], atol=1e-4)
        text += step.piece
    if constrained:
        assert text.decode() in words
    llm.truncate(0)
    model.reset()


# -- a property test: schemas from the supported subset ---------------------------------------------------
LEAF = st.one_of(
    st.just({"type": "integer"}), st.just({"type": "boolean"}), st.just({"type": "number"}),
    st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.sampled_from(["red", "green", "blue", "circle", "square"]), min_size=1, max_size=3, unique=True)
      .map(lambda values: {"enum": values}),
)
FIELD = st.one_of(LEAF, LEAF.flatmap(lambda item: st.integers(1, 3).map(
    lambda n: {"type": "array", "items": item, "maxItems": n})))
SCHEMAS = st.dictionaries(st.sampled_from(["count", "color", "shape", "left", "size", "seen"]), FIELD,
                          min_size=1, max_size=3).flatmap(
    lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
        lambda required: {"type": "object", "properties": props, "required": required}))


def test_generated_schemas_give_answers_that_validate(model):
    outcomes = []

    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(SCHEMAS)
    def check(schema):
        a = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=96, sampling=GREEDY), schema=schema)
        complete = a.stop_reason == "eos"
        outcomes.append(complete)
        if complete:
            jsonschema.validate(a.parsed, schema)  # every complete answer fits its schema
    check()
    assert len(outcomes) == 25 and sum(outcomes) >= 0.8 * len(outcomes), outcomes


# -- the CLI ------------------------------------------------------------------------------------------------
def _cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONVLLAVA_EDGE_CACHE": str(tmp / "cache")}
    return subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_ask_and_batch_take_a_schema_file_or_text(tmp_path):
    schema = tmp_path / "count.json"
    schema.write_text(json.dumps(COUNT))
    out = _cli("ask", str(EXAMPLE), QUESTION, "--temperature", "0", "--json-schema", str(schema), "--json", tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    jsonschema.validate(row["parsed"], COUNT)
    assert json.loads(row["answer"]) == row["parsed"]
    log = tmp_path / "answers.jsonl"
    out = _cli("batch", str(EXAMPLE), "--question", QUESTION, "--out", str(log), "--temperature", "0",
               "--json-schema", json.dumps(COUNT), tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["parsed"] == row["parsed"] and line["answer"] == row["answer"]


@pytest.mark.parametrize("args, needle", [
    (["--json-schema", '{"type": "integer", "minimum": 0}'], "keyword 'minimum' at /minimum"),
    (["--json-schema", "{not json"], "--json-schema {not json: not JSON"),
    (["--grammar", "/nonexistent.gbnf"], "--grammar /nonexistent.gbnf: no such file"),
    (["--json-schema", '{"type": "object"}', "--grammar", "/nonexistent.gbnf"], "no such file"),
])
def test_cli_bad_constraints_are_one_line_and_exit_1(tmp_path, args, needle):
    out = _cli("ask", str(EXAMPLE), QUESTION, *args, tmp=tmp_path)
    assert out.returncode == 1 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""


def test_cli_grammar_that_does_not_parse_says_llama_cpps_reason(tmp_path):
    grammar = tmp_path / "bad.gbnf"
    grammar.write_text('root ::= "a" |\nitem ::= [a-')
    out = _cli("ask", str(EXAMPLE), QUESTION, "--grammar", str(grammar), tmp=tmp_path)
    assert out.returncode == 1 and "the grammar does not parse" in out.stderr and "(line 2)" in out.stderr, out.stderr


# -- serve: the official clients ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-structured"), "--max-tokens-cap", "96")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _messages(question: str = QUESTION) -> list[dict]:
    return image_messages(EXAMPLE, question)


def test_openai_parse_with_a_pydantic_model(client, model):
    completion = client.chat.completions.parse(model="shapes-demo", messages=_messages(), response_format=Answer,
                                               temperature=0, max_tokens=48)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Answer) and completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(message.content), Answer.model_json_schema())
    local = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=48, sampling=GREEDY), schema=Answer)
    assert message.content == local.text  # the server's constraint is the library's, token for token


def test_openai_json_object_and_a_streamed_json_schema(client, model):
    r = client.chat.completions.create(model="shapes-demo", messages=_messages(), temperature=0, max_tokens=64,
                                       response_format={"type": "json_object"})
    # The demo model never saw JSON: free to write any object, it may not close it within max_tokens
    local = model.ask(EXAMPLE, QUESTION, AskOptions(max_tokens=64, sampling=GREEDY, constraint=json_object()))
    assert r.choices[0].message.content == local.text and local.text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(local.text), dict)
    schema = {"type": "object", "properties": {"count": {"type": "integer"}, "shapes": {
        "type": "array", "items": {"enum": ["circle", "square", "triangle"]}, "maxItems": 3}}, "required": ["count"]}
    parts = list(client.chat.completions.create(
        model="shapes-demo", messages=_messages(), temperature=0, max_tokens=64, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "scene", "schema": schema, "strict": True}}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    jsonschema.validate(json.loads(text), schema)
    assert parts[-1].choices[0].finish_reason == "stop"


def test_openai_logprobs_streamed_and_not(client):
    r = client.chat.completions.create(model="shapes-demo", messages=_messages(), temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content).strip() == r.choices[0].message.content
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob and c.logprob <= 0 for c in content)
    assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content)
    parts = list(client.chat.completions.create(model="shapes-demo", messages=_messages(), temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=3, stream=True))
    streamed = [c for p in parts if p.choices and p.choices[0].logprobs for c in p.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == [(c.token, round(c.logprob, 4)) for c in content]
    plain = client.chat.completions.create(model="shapes-demo", messages=_messages(), temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_openai_bad_schemas_and_refused_fields_are_400_before_any_stream(client):
    for kwargs, needle in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "integer", "maximum": 3}}}}, "maximum"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}}}}, "cannot be turned into a grammar"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
          "response_format": {"type": "json_object"}}, "both constrain the answer"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ]:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="shapes-demo", messages=_messages(), max_tokens=8, stream=stream,
                                               **kwargs)
            assert needle in e.value.message, e.value.message


def test_a_cut_answer_is_finish_reason_length(client):
    r = client.chat.completions.create(model="shapes-demo", messages=_messages(), temperature=0, max_tokens=3,
                                       response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COUNT}})
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.content.endswith("}")


def test_ollama_format_with_a_schema_and_json(server):
    c = ollama.Client(host=server.url, timeout=60)
    image = EXAMPLE.read_bytes()
    r = c.chat(model="shapes-demo", messages=[{"role": "user", "content": QUESTION, "images": [image]}],
               format=Answer.model_json_schema(), options={"temperature": 0, "num_predict": 48}, stream=False)
    Answer.model_validate_json(r.message.content)
    g = c.generate(model="shapes-demo", prompt=QUESTION, images=[image], format="json", stream=False,
                   options={"temperature": 0, "num_predict": 48})
    assert g.response.startswith("{")  # any object: the demo model may not close it (see the OpenAI test)
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)
    parts = list(c.chat(model="shapes-demo", messages=[{"role": "user", "content": QUESTION, "images": [image]}],
                        format=COUNT, options={"temperature": 0, "num_predict": 48}, stream=True, logprobs=True,
                        top_logprobs=2))
    jsonschema.validate(json.loads("".join(p.message.content for p in parts)), COUNT)
    assert [lp.token for p in parts for lp in (p.logprobs or [])] and parts[-1].done
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="shapes-demo", messages=[{"role": "user", "content": QUESTION}], format={"type": "string",
                                                                                             "format": "email"})
    assert e.value.status_code == 400 and "email" in e.value.error


# -- the request fields of both APIs and pydantic's schemas (the clients' own types) ------------------------
class Shape(pydantic.BaseModel):
    kind: typing.Literal["circle", "square", "triangle"]
    color: str = pydantic.Field(max_length=12, description="its color")


class Scene(pydantic.BaseModel):
    count: int
    shapes: list[Shape] = pydantic.Field(max_length=4)
    note: str | None = None


def test_a_pydantic_schema_with_refs_and_annotations_becomes_a_grammar():
    c = from_schema(Scene)
    assert c.kind == "json_schema" and c.schema["$defs"]["Shape"]["title"] == "Shape"
    assert 'root ::= "{" space count-kv' in c.grammar and '"\\"circle\\""' in c.grammar
    # the port's string character admitted raw control characters, which JSON refuses inside strings
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F]' in c.grammar
    assert from_schema(Scene).grammar == c.grammar  # the same schema, the same (cached) grammar


def _openai_fields() -> set[str]:
    return set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {"stream"}


def test_every_openai_request_field_is_implemented_without_effect_or_refused():
    known = OPENAI_IMPLEMENTED | set(OPENAI_NO_EFFECT) | set(OPENAI_REFUSED)
    assert _openai_fields() <= known, sorted(_openai_fields() - known)
    assert not (OPENAI_IMPLEMENTED & set(OPENAI_REFUSED)) and not (OPENAI_IMPLEMENTED & set(OPENAI_NO_EFFECT))


def test_every_ollama_request_field_and_option_is_implemented_without_effect_or_refused():
    fields = set(ollama_types.ChatRequest.model_fields) | set(ollama_types.GenerateRequest.model_fields)
    known = ollama_api.OLLAMA_IMPLEMENTED | set(ollama_api.OLLAMA_NO_EFFECT) | set(ollama_api.OLLAMA_REFUSED)
    assert fields <= known, sorted(fields - known)
    options = set(ollama_types.Options.model_fields)
    known = ollama_api.OLLAMA_OPTIONS_IMPLEMENTED | set(ollama_api.OLLAMA_OPTIONS_NO_EFFECT) | \
        set(ollama_api.OLLAMA_OPTIONS_REFUSED)
    assert options <= known, sorted(options - known)
