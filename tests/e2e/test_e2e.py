"""End to end: export -> ask/chat, token-exact against the transformers reference pipeline.

The bundle under test: F32 GGUF + fp32 ONNX from the tiny bf16 .bin checkpoint. The reference
(tests/support/reference.py) never touches convllava_edge's runtime. Exactness holds with llama.cpp's
default F16 KV cache on these peaky tiny models; ``ask`` runs exactly as a user runs it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convllava_edge
from convllava_edge.cache import DiskCache
from convllava_edge.cli.main import main
from convllava_edge.export.probe_images import probe_images
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.manifest import MANIFEST_NAME
from convllava_edge.model import AskOptions

from support.reference import ReferencePipeline

GREEDY = AskOptions(max_tokens=12, sampling=SamplingOptions(temperature=0.0))
QUESTIONS = ["What is in the image?", "How many shapes are there?", "Is the red one on the left or the right?"]


@pytest.fixture(scope="module")
def f32_bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("fp32",), llm_type="F32")  # shared with test_triton.py


@pytest.fixture(scope="module")
def q4_bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("int8", "fp32"), llm_type="Q4_K_M")


@pytest.fixture(scope="module")
def reference(tiny):
    return ReferencePipeline(tiny.bin_ckpt, tiny.tower)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    wide, tall = probe_images(5, seed=40)[3], probe_images(5, seed=41)[4]  # 800x320 and 300x700
    assert wide.width > wide.height and tall.height > tall.width
    paths = {"wide": folder / "wide.png", "tall": folder / "tall.jpg"}
    wide.save(paths["wide"])
    tall.save(paths["tall"], quality=92)
    return paths


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ask_json(capsys, *args) -> dict:
    assert main(["ask", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("which", ["wide", "tall"])
def test_ask_is_token_exact(f32_bundle, reference, images, which, capsys, cache_dir):
    image = Image.open(images[which])
    for question in QUESTIONS[:2]:
        result = _ask_json(capsys, images[which], question, "--model", f32_bundle, "--temperature", "0",
                           "--max-tokens", "12", "--no-cache")
        expected = reference.generate(image, [(question, None)], max_new_tokens=12)
        assert result["token_ids"] == expected, question
        assert result["n_image_tokens"] == 16
        assert set(result["timings"]) >= {"preprocess_ms", "encode_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s"}
        assert result["answer"] == reference.decode(expected)


def test_second_chat_turn_is_token_exact_and_reuses_the_kv_cache(f32_bundle, reference, images, cache_dir):
    image = Image.open(images["wide"])
    model = convllava_edge.load(f32_bundle)
    chat = model.chat(images["wide"], GREEDY)
    first = chat.ask(QUESTIONS[0])
    expected1 = reference.generate(image, [(QUESTIONS[0], None)], 12)
    assert first.token_ids == expected1
    second = chat.ask(QUESTIONS[1])
    expected2 = reference.generate(image, [(QUESTIONS[0], reference.decode(expected1)), (QUESTIONS[1], None)], 12)
    assert second.token_ids == expected2
    # The second turn evaluates only what follows the shared prefix (system prompt, image, first turn).
    assert second.n_evaluated < second.n_prompt_positions - first.n_image_tokens
    assert second.timings["encode_ms"] == 0.0
    third = chat.ask(QUESTIONS[2])
    expected3 = reference.generate(image, [(QUESTIONS[0], reference.decode(expected1)),
                                           (QUESTIONS[1], reference.decode(expected2)), (QUESTIONS[2], None)], 12)
    assert third.token_ids == expected3


def test_quantized_bundle_runs_and_first_tokens_agree(q4_bundle, reference, images, cache_dir):
    model = convllava_edge.load(q4_bundle)
    assert model.vision_entry.variant == "int8" and model.manifest.llm.type == "Q4_K_M"
    agree = []
    for which in ("wide", "tall"):
        for question in QUESTIONS:
            ours = model.ask(images[which], question, GREEDY)
            expected = reference.generate(Image.open(images[which]), [(question, None)], 12)
            assert ours.token_ids and ours.stop_reason in ("eos", "stop", "length")
            agree.append(ours.token_ids[0] == expected[0])
    # Measured here: 4 of 6 (the F32 + fp32 bundle: 6 of 6, token-exact). A random model's logit
    # margins are small, so 4-bit weights flip some first tokens; the trained demo model's accuracy
    # through Q4_K_M is measured in test_demo_model.py.
    assert sum(agree) >= 3, f"first-token agreement {sum(agree)}/{len(agree)}"


def test_cache_hit_skips_the_encoder_and_gives_the_same_answer(f32_bundle, images, cache_dir, capsys):
    args = [images["tall"], QUESTIONS[1], "--model", f32_bundle, "--temperature", "0", "--max-tokens", "8"]
    cold = _ask_json(capsys, *args)
    warm = _ask_json(capsys, *args)
    assert not cold["cache_hit"] and warm["cache_hit"]
    assert warm["timings"]["encode_ms"] == 0.0 and cold["timings"]["encode_ms"] > 0
    assert warm["token_ids"] == cold["token_ids"]
    # the embeddings, the KV state up to the image, and the KV state of the text before it (the system prompt)
    assert DiskCache(cache_dir).entries() == 3
    assert cold["n_evaluated"] == cold["n_prompt_positions"]
    assert warm["n_evaluated"] < warm["n_prompt_positions"] - warm["n_image_tokens"]
    native = _ask_json(capsys, *args, "--aspect", "native")  # another preprocessing is another key
    assert not native["cache_hit"] and native["n_image_tokens"] != cold["n_image_tokens"]
    uncached = _ask_json(capsys, *args, "--no-cache")
    assert not uncached["cache_hit"]


def test_kv_state_after_the_image_is_reused_by_later_asks_and_stays_token_exact(f32_bundle, reference, images,
                                                                                   cache_dir, capsys):
    base = ["--model", f32_bundle, "--temperature", "0", "--max-tokens", "12"]
    # Each CLI call loads the bundle afresh: only the disk cache carries anything over.
    first = _ask_json(capsys, images["wide"], QUESTIONS[0], *base)
    image = Image.open(images["wide"])
    for question in QUESTIONS[1:]:
        later = _ask_json(capsys, images["wide"], question, *base)
        assert later["token_ids"] == reference.generate(image, [(question, None)], 12), question
        # evaluated: only the chunk after the image; system prompt and image rows came from the state
        assert later["n_evaluated"] < later["n_prompt_positions"] - later["n_image_tokens"]
    # another image: only the text before it (the system prompt) is reused, and the answer stays exact
    other = _ask_json(capsys, images["tall"], QUESTIONS[1], *base)
    assert other["token_ids"] == reference.generate(Image.open(images["tall"]), [(QUESTIONS[1], None)], 12)
    system_prompt = _positions_before_image(f32_bundle)
    assert system_prompt > 10
    assert other["n_evaluated"] == other["n_prompt_positions"] - system_prompt
    uncached = _ask_json(capsys, images["wide"], QUESTIONS[1], *base, "--no-cache")
    assert uncached["n_evaluated"] == uncached["n_prompt_positions"]


def _positions_before_image(bundle) -> int:
    """Positions the prompt takes before the image slot, from the bundle's own template and tokenizer."""
    from convllava_edge.prompt import ImageSlot, image_end, positions

    model = convllava_edge.load(bundle)
    items = model.prompt_items([(QUESTIONS[1], None)], ImageSlot("x", 16))
    model.close()
    return positions(items[:image_end(items) - 1])


def test_cache_evicts_least_recently_used(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=3 * 4096 + 3 * 128)  # room for three 1024-float arrays
    arrays = {f"{i:064x}": np.full((1, 1024), i, dtype=np.float32) for i in range(4)}
    for n, (key, value) in enumerate(arrays.items()):
        cache.put(key, value)
        if n == 1:
            os.utime(cache._path(f"{0:064x}"), (1, 1))  # make key 0 the oldest
    assert cache.get(f"{0:064x}") is None
    assert all(cache.get(k) is not None for k in list(arrays)[1:])


def test_cache_survives_concurrent_writers(tmp_path):
    code = ("import sys, numpy as np\nfrom convllava_edge.cache import DiskCache\n"
            "c = DiskCache(sys.argv[1], max_bytes=200_000)\n"
            "for i in range(60):\n    c.put(f'{i % 7:064x}', np.full((1, 2048), i % 7, np.float32))\n"
            "    v = c.get(f'{(i + 3) % 7:064x}')\n    assert v is None or (v == (i + 3) % 7).all()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]


def test_streaming_output_is_the_answer(f32_bundle, images, cache_dir):
    result = subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", "ask", str(images["wide"]), QUESTIONS[0],
                             "--model", str(f32_bundle), "--temperature", "0", "--max-tokens", "12"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model = convllava_edge.load(f32_bundle)
    pieces = list(model.ask_stream(images["wide"], QUESTIONS[0], GREEDY))
    assert result.stdout == "".join(pieces) + "\n"
    assert re.search(r"image tokens \(encoded in \d+ ms\); first token after", result.stderr)


def test_sampling_is_seeded(f32_bundle, images, cache_dir):
    model = convllava_edge.load(f32_bundle)
    hot = AskOptions(max_tokens=10, sampling=SamplingOptions(temperature=1.5, seed=7))
    a, b = model.ask(images["wide"], QUESTIONS[0], hot), model.ask(images["wide"], QUESTIONS[0], hot)
    assert a.token_ids == b.token_ids
    other = model.ask(images["wide"], QUESTIONS[0], AskOptions(max_tokens=10, sampling=SamplingOptions(1.5, seed=8)))
    greedy = model.ask(images["wide"], QUESTIONS[0], AskOptions(max_tokens=10, sampling=SamplingOptions(0.0)))
    assert len({tuple(a.token_ids), tuple(other.token_ids), tuple(greedy.token_ids)}) > 1


def test_context_overflow_is_a_clear_error(f32_bundle, images, capsys, cache_dir):
    assert main(["ask", str(images["wide"]), "hi", "--model", str(f32_bundle), "--max-tokens", "5000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"error: 1 image of \d+ tokens \+ \d+ text positions \+ up to 5000 answer tokens > the context's "
                    r"2048 positions", err), err


# -- bad inputs, through a real subprocess: one line, exit 1, no traceback ------------------------
def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CONVLLAVA_EDGE_CACHE": "/tmp/convllava-test-cache"})


def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    buf = io.BytesIO()
    probe_images(1, seed=2)[0].save(buf, format="PNG")
    data = buf.getvalue()
    cases = {"missing": (folder / "missing.png", "no such file"), "empty": (folder / "empty.png", "empty file"),
             "truncated": (folder / "truncated.png", "cannot decode"), "not-image": (folder / "notes.txt", "not an image"),
             "bomb": (folder / "bomb.png", "decompression bomb")}
    cases["empty"][0].write_bytes(b"")
    cases["truncated"][0].write_bytes(data[: len(data) // 3])
    cases["not-image"][0].write_text("hello")
    Image.new("1", (9500, 9500)).save(cases["bomb"][0])
    return cases


def test_bad_images(f32_bundle, tmp_path):
    for name, (path, message) in _bad_images(tmp_path).items():
        result = _run("ask", path, "What is it?", "--model", f32_bundle)
        assert result.returncode == 1, name
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: {path}") and message in lines[-1], (name, result.stderr)
        assert "Traceback" not in result.stderr


def _broken_bundles(src: Path, folder: Path):
    def copy(name):
        dst = folder / name
        shutil.copytree(src, dst)
        return dst

    manifest = json.loads((src / MANIFEST_NAME).read_text())
    llm_file = manifest["llm"]["file"]
    b = copy("missing")
    (b / llm_file).unlink()
    yield b, f"{b / llm_file}: missing"
    b = copy("altered")
    with open(b / llm_file, "r+b") as f:
        f.seek(-5, 2)
        f.write(b"XXXXX")
    yield b, f"{b / llm_file}: SHA-256 does not match"
    b = copy("truncated")
    with open(b / llm_file, "r+b") as f:
        f.truncate(100)
    yield b, "size 100 bytes, manifest says"
    for name, bad in (("dotdot", "../../etc/passwd"), ("absolute", "/etc/passwd")):
        b = copy(name)
        m = json.loads((b / MANIFEST_NAME).read_text())
        m["files"][-1]["path"] = bad
        m["llm"]["file"] = bad
        (b / MANIFEST_NAME).write_text(json.dumps(m))
        yield b, f"file name {bad!r} points outside the bundle"
    b = copy("symlink")
    outside = folder / "outside.gguf"
    shutil.move(b / llm_file, outside)
    os.symlink(outside, b / llm_file)
    yield b, "symbolic link leads outside the bundle"
    b = copy("no-manifest")
    (b / MANIFEST_NAME).unlink()
    yield b, "no manifest.json"


def test_bad_bundles(f32_bundle, images, tmp_path):
    for bundle, message in _broken_bundles(f32_bundle, tmp_path):
        result = _run("ask", images["wide"], "What is it?", "--model", bundle)
        assert result.returncode == 1, bundle.name
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (bundle.name, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature must be a number in [0, 100]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--aspect", "stretch"], "unknown aspect mode 'stretch'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--vision-type", "fp16"], "has no fp16 vision graph"),
])
def test_bad_options(f32_bundle, images, args, message, capsys, cache_dir):
    assert main(["ask", str(images["wide"]), "hi", "--model", str(f32_bundle), *args]) == 1
    assert message in capsys.readouterr().err


def test_info_shows_the_llm(f32_bundle, capsys):
    assert main(["info", str(f32_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["llm"]["type"] == "F32" and info["template"]["name"] == "vicuna_v1"
    assert info["tokenizer"] == {"kind": "sentencepiece", "add_space_prefix": True, "space_after_special": False}


def test_quantized_bundle_manifest_records_agreement(q4_bundle):
    manifest = json.loads((q4_bundle / MANIFEST_NAME).read_text())
    agreement = manifest["accuracy"]["llm_vs_unquantized"]
    assert agreement["n_positions"] > 0 and 0 <= agreement["top1"] <= 1 and agreement["kl_mean"] >= 0
    assert manifest["llm"]["tensor_types"]["Q4_K"] > 0 and manifest["llm"]["fallbacks"] == 0
    assert sorted(p.name for p in q4_bundle.iterdir()) == ["README.md", "llm-q4_k_m.gguf", "manifest.json",
                                                           "vision-fp32.onnx", "vision-int8.onnx"]


def test_bench_reports_every_figure_and_the_cache_hit(f32_bundle, images, capsys):
    assert main(["bench", str(f32_bundle), "--image", str(images["wide"]), "--runs", "2", "--max-tokens", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for series in ("cold", "cache_hit"):
        assert set(result[series]) == {"preprocess_ms", "encode_ms", "prefill_ms", "prefill_tokens_per_s",
                                       "time_to_first_token_ms", "decode_ms", "decode_tokens_per_s"}
        assert set(result[series]["prefill_ms"]) == {"median", "min", "max", "spread"}
    assert result["cold"]["encode_ms"]["median"] > 0 and result["cache_hit"]["encode_ms"]["max"] == 0.0
    assert result["vision"]["providers"] == ["CPUExecutionProvider"] and result["llm"]["threads"] >= 1
    assert result["n_image_tokens"] == 16 and result["n_generated"] >= 1 and result["peak_rss_mb"] > 0
    # the fraction itself is a speed figure (benchmarks/); on a 16-token tiny bundle the encoder costs less
    # than timing noise, so only its definition is checked here
    ttft = {series: result[series]["time_to_first_token_ms"]["median"] for series in ("cold", "cache_hit")}
    assert result["cache_hit_ttft_fraction"] == pytest.approx(ttft["cache_hit"] / ttft["cold"])


def test_export_time_llm_agreement_is_measured_on_answers(q4_bundle):
    """The manifest's export-time figure is taken where users meet the LLM: the unquantized model's own greedy
    answers (the last prompt position and each answer token), labelled so; not every question position."""
    from convllava_edge.export.convllava import AGREEMENT_ANSWER_TOKENS, AGREEMENT_IMAGES, AGREEMENT_QUESTIONS

    agree = json.loads((q4_bundle / MANIFEST_NAME).read_text())["accuracy"]["llm_vs_unquantized"]
    prompts = AGREEMENT_IMAGES * len(AGREEMENT_QUESTIONS)
    assert prompts <= agree["n_positions"] <= prompts * (AGREEMENT_ANSWER_TOKENS + 1)
    assert agree["measured_on"].startswith(f"{agree['n_positions']} answer positions")
    assert "int8 graph" in agree["measured_on"]  # the bundle's own default graph made the image rows
    assert 0 <= agree["kl_mean"] <= agree["kl_p99"] and 0 <= agree["top1"] <= 1


def test_agreement_evaluating_the_image_once_gives_the_logits_of_each_prompt_from_position_0(q4_bundle):
    """The export's agreement step evaluates the system prompt and the image once per image and each question after
    them (export/convllava _after_shared_image). Every logit must be bit-identical to the same evaluation started
    from position 0: the reference's greedy answers (the prompt through sequence_logits, then one token at a time)
    and the candidate's teacher-forced rows (prompt and answer through sequence_logits)."""
    from convllava_edge.backends.llm_llamacpp import LlamaCppBackend
    from convllava_edge.export.convllava import (AGREEMENT_ANSWER_TOKENS, AGREEMENT_QUESTIONS, _after_shared_image,
                                                 _greedy_answer)
    from convllava_edge.manifest import load_manifest
    from convllava_edge.prompt import VICUNA_V1, ImageSlot
    from convllava_edge.quantize.accuracy import sequence_logits
    from convllava_edge.tokenizer import PromptTokenizer

    llm = LlamaCppBackend(q4_bundle / "llm-q4_k_m.gguf", n_ctx=1024, threads=2, kv_f32=True, trial=False)
    try:
        tokenizer = PromptTokenizer(llm, load_manifest(q4_bundle).tokenizer)
        embeds = {"probe": np.random.default_rng(5).normal(0, 1, (16, llm.n_embd)).astype(np.float32)}
        slot = ImageSlot("probe", 16)
        prompts = [tokenizer.items(VICUNA_V1.render([(q, None)]), slot) for q in AGREEMENT_QUESTIONS]
        shared = [_greedy_answer(llm, text) for text in _after_shared_image(llm, prompts, embeds)]
        for items, (answer, rows) in zip(prompts, shared, strict=True):
            expected, want = [sequence_logits(llm, items, embeds)[-1]], []
            while len(want) < AGREEMENT_ANSWER_TOKENS and not llm.is_end(int(np.argmax(expected[-1]))):
                want.append(int(np.argmax(expected[-1])))
                llm.eval_tokens([want[-1]])
                expected.append(llm.last_logits())
            assert answer == want and len(answer) > 0 and np.array_equal(rows, np.stack(expected))
        forced = [llm.eval_tokens(text + answer, all_logits=True)[-len(rows):]
                  for (answer, rows), text in zip(shared, _after_shared_image(llm, prompts, embeds))]
        for items, (answer, rows), got in zip(prompts, shared, forced, strict=True):
            assert np.array_equal(got, sequence_logits(llm, list(items) + answer, embeds)[-len(rows):])
    finally:
        llm.close()
