"""Hostile and careless input through the CLI: one line on stderr, exit 1, never a traceback or a signal.

Cases that could abort or exhaust memory run as a real ``convllava-edge`` process with an
address-space limit and a timeout (cli_runs.cli); the rest call ``main`` in process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from convllava_edge.cache import DiskCache
from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.cli.main import main
from convllava_edge.errors import ConfigError
from convllava_edge.manifest import MANIFEST_NAME
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.model import AskOptions, Model
from convllava_edge.prompt import ChatTemplate, render_bounded, _jinja

from support.cli_runs import EXAMPLE, GiB, cli, copy_demo, gguf_of, patch_gguf_scalar, rehash

GREEDY = AskOptions(max_tokens=8, sampling=SamplingOptions(temperature=0.0))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-errors-cache")


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    return copy_demo(tmp_path_factory.mktemp("demo") / "demo")


def one_line(capsys, code, *needles):
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


# -- crafted GGUFs in a re-hashed bundle --------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("key, fmt, value, needle", [
    ("llama.block_count", "I", 0, "block_count"),
    ("llama.block_count", "I", 100000, "block_count"),
    ("llama.attention.layer_norm_rms_epsilon", "f", float("nan"), "epsilon"),
])
def test_crafted_gguf_in_a_rehashed_bundle_is_one_line(tmp_path, cache_dir, key, fmt, value, needle):
    bundle = copy_demo(tmp_path / "b")
    patch_gguf_scalar(gguf_of(bundle), key, fmt, value)
    rehash(bundle)
    run = cli("ask", str(EXAMPLE), "How many shapes are there?", "--model", str(bundle),
              env={"CONVLLAVA_EDGE_CACHE": str(cache_dir)})
    run.assert_one_line_error(str(gguf_of(bundle)), needle)


@pytest.mark.timeout(300)
def test_duplicated_vocabulary_token_is_one_line(tmp_path, cache_dir):
    bundle = copy_demo(tmp_path / "b")
    gguf = gguf_of(bundle)
    data = gguf.read_bytes()
    # two tokens of the same byte length: make the second a copy of the first ("<0x41>" -> "<0x40>")
    a, b = data.find(b"<0x41>"), data.find(b"<0x40>")
    assert a > 0 and b > 0
    gguf.write_bytes(data[:a] + b"<0x40>" + data[a + 6:])
    rehash(bundle)
    run = cli("ask", str(EXAMPLE), "How many shapes are there?", "--model", str(bundle),
              env={"CONVLLAVA_EDGE_CACHE": str(cache_dir)})
    run.assert_one_line_error("duplicate")


# -- memory: a 256-byte PNG that pads to 3.6 gigapixels ---------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("aspect", ["pad", "crop", "native"])
def test_thin_image_does_not_exhaust_memory(tmp_path, cache_dir, aspect):
    path = tmp_path / "thin.png"
    Image.new("RGB", (60000, 1), (200, 10, 10)).save(path)
    assert path.stat().st_size < 1000
    run = cli("ask", str(path), "How many shapes are there?", "--aspect", aspect, "--max-tokens", "4",
              "--model", str(DEMO_BUNDLE), "--device", "cpu", env={"CONVLLAVA_EDGE_CACHE": str(cache_dir)},
              memory=3 * GiB)
    if aspect == "native":  # keeps the aspect ratio within the square's pixel budget: a real answer
        assert run.returncode == 0, run.stderr
    else:
        run.assert_one_line_error(str(path), "60000x1")


@pytest.mark.timeout(120)
def test_manifest_preprocess_sizes_are_bounded(demo_copy, tmp_path, capsys):
    bundle = copy_demo(tmp_path / "b")
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["preprocess"]["image_size"] = 100000
    data["preprocess"]["crop_size"] = [100032, 100032]
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    one_line(capsys, main(["info", str(bundle)]), str(bundle / MANIFEST_NAME))


# -- the cache is not trusted -------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_cached_embeddings_of_the_wrong_shape_are_misses(tmp_path):
    """Entries with a valid checksum but a shape this bundle never makes (the cache itself refuses
    NaN and damaged entries: tests/unit/test_cache_entries.py)."""
    cache = DiskCache(tmp_path / "cache")
    model = Model(DEMO := copy_demo(tmp_path / "b"), cache=cache, device="cpu")
    truth = model.ask(EXAMPLE, "How many shapes are there?", GREEDY)
    assert truth.text == "3" and not truth.cache_hit
    key = next(iter(model.images.memory))
    for bad in (np.zeros((0, model.manifest.n_embd), np.float32),  # "[0, 256]": 0 image tokens
                np.zeros((5, model.manifest.n_embd + 1), np.float32),  # another width
                model.images.memory[key].astype(np.float64)):
        cache.put(key, bad)
        fresh = Model(DEMO, cache=cache, device="cpu")
        answer = fresh.ask(EXAMPLE, "How many shapes are there?", GREEDY)
        assert answer.text == "3" and not answer.cache_hit and answer.n_image_tokens == truth.n_image_tokens
        fresh.close()
    model.close()


# -- a chat template that never ends -------------------------------------------------------------
NESTED = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"


@pytest.mark.timeout(60)
def test_nested_loop_template_stops_in_bounded_time_on_any_thread():
    template = _jinja(NESTED)
    errors = []

    def render():
        try:
            render_bounded(template)
        except ConfigError as e:
            errors.append(e)

    t0 = time.perf_counter()
    worker = threading.Thread(target=render)  # the server renders off the main thread: no signal.alarm there
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and len(errors) == 1 and "did not finish" in str(errors[0])
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ConfigError, match="did not finish"):
        render_bounded(template)  # and on the main thread
    with pytest.raises(ConfigError, match="too long"):
        render_bounded(_jinja("{{ 'x' * 10000000000 }}"))
    with pytest.raises(ConfigError, match="boom"):
        render_bounded(_jinja("{{ raise_exception('boom') }}"))
    assert render_bounded(_jinja("{% for m in messages %}{{ m }}{% endfor %}"), messages=["a", "b"]) == "ab"


@pytest.mark.timeout(120)
def test_hostile_template_in_a_manifest_is_one_line(tmp_path, capsys):
    bundle = copy_demo(tmp_path / "b")
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["template"] = ChatTemplate("evil", NESTED, "sys", "<s>").to_dict()
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    t0 = time.perf_counter()
    one_line(capsys, main(["info", str(bundle)]), "did not finish")
    assert time.perf_counter() - t0 < 30
    data["template"] = ChatTemplate("broken", "{% for %}", "sys", "<s>").to_dict()
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    one_line(capsys, main(["info", str(bundle)]), "does not compile")


# -- sampling values and thread counts --------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, needle", [
    (["--temperature", "nan"], "temperature"), (["--temperature", "inf"], "temperature"),
    (["--top-p", "nan"], "top_p"), (["--threads", "1000"], "threads"),
])
def test_nonsense_numbers_are_refused(capsys, args, needle):
    one_line(capsys, main(["ask", str(EXAMPLE), "How many shapes are there?", *args]), needle)


# -- one line for every error ---------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_invalid_utf8_question_is_one_line(cache_dir):
    run = cli("ask", str(EXAMPLE), b"How many \xff shapes?", env={"CONVLLAVA_EDGE_CACHE": str(cache_dir)})
    run.assert_one_line_error("UTF-8")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(files=[[[[]]]]), "malformed"),  # nested where records go
    (lambda d: d.update(n_embd="256"), "n_embd"),  # mistyped
    (lambda d: d.pop("vision"), "vision"),  # incomplete
    (lambda d: d["files"][0].update(size="12"), "size"),
    (lambda d: d.update(template={"kind": "jinja"}), "malformed"),
    (lambda d: d.update(tokens_per_image={"square": -4}), "tokens_per_image"),
])
def test_malformed_manifests_are_one_line(tmp_path, capsys, mutate, needle):
    bundle = copy_demo(tmp_path / "b")
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    mutate(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    one_line(capsys, main(["info", str(bundle)]), needle)


@pytest.mark.timeout(120)
def test_deeply_nested_manifest_is_one_line(tmp_path, capsys):
    bundle = copy_demo(tmp_path / "b")
    (bundle / MANIFEST_NAME).write_text("[" * 100000 + "]" * 100000)
    one_line(capsys, main(["info", str(bundle)]), "nested too deep")


@pytest.mark.timeout(120)
def test_onnx_runtime_failing_at_run_time_is_one_line(tmp_path):
    """A graph that passes its hash check but asks for 4 TB when run."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 1 << 20, 1 << 20])  # 4 TiB of float32
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
         helper.make_node("ReduceSum", ["pixel_values"], ["s"], keepdims=0),
         helper.make_node("Add", ["big", "s"], ["image_embeds"])],
        "bomb", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, None)], initializer=[shape])
    path = tmp_path / "bomb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    script = ("import numpy as np\nfrom convllava_edge.families.convllava import ConvLlavaEncoder\n"
              "from convllava_edge.errors import BundleError\n"
              f"enc = ConvLlavaEncoder.from_file({str(path)!r}, 'cpu', 1)\n"
              "try:\n    enc.encode(np.zeros((1, 3, 64, 64), np.float32))\nexcept BundleError as e:\n"
              "    print('REFUSED', e)\n")
    import subprocess
    import sys
    import resource

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (4 * GiB, 4 * GiB)))
    assert proc.returncode == 0 and proc.stdout.startswith("REFUSED") and "ONNX Runtime failed" in proc.stdout, \
        (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "\n" not in proc.stdout.strip()


@pytest.mark.timeout(60)
def test_memory_error_and_unexpected_errors_are_one_line(monkeypatch, capsys):
    import convllava_edge.cli.main as cli_main

    def boom(*args):
        raise MemoryError()

    monkeypatch.setattr(cli_main, "_checked_image", boom)
    one_line(capsys, main(["ask", str(EXAMPLE), "?"]), "out of memory")

    def bug(*args):
        raise KeyError("surprise")

    monkeypatch.setattr(cli_main, "_checked_image", bug)
    one_line(capsys, main(["ask", str(EXAMPLE), "?"]), "unexpected KeyError", "CONVLLAVA_EDGE_DEBUG")
    monkeypatch.setenv("CONVLLAVA_EDGE_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["ask", str(EXAMPLE), "?"])


@pytest.mark.timeout(60)
def test_lint_on_a_non_onnx_file_and_encode_into_a_missing_folder(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf" * 10)
    one_line(capsys, main(["lint", str(junk)]), str(junk), "not an ONNX graph")
    target = tmp_path / "missing" / "x.npy"
    one_line(capsys, main(["encode", str(EXAMPLE), "--model", str(DEMO_BUNDLE), "--save", str(target)]),
             str(tmp_path / "missing"))
    assert not target.parent.exists()


# -- markup in a bundle's name is text --------------------------------------------------------------
@pytest.mark.timeout(60)
def test_rich_markup_in_a_bundle_name_is_printed_as_text(tmp_path, capsys):
    bundle = copy_demo(tmp_path / "b")
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["name"] = "[red]evil[/red] [link=file:///etc/passwd]x[/link]"
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["info", str(bundle)]) == 0
    assert "[red]evil[/red] [link=file:///etc/passwd]x[/link]" in capsys.readouterr().out


# -- a stats line with only meaningful figures -------------------------------------
@pytest.mark.timeout(120)
def test_stats_line_has_no_rate_for_a_one_token_answer(cache_dir):
    run = cli("ask", str(EXAMPLE), "How many shapes are there?", "--temperature", "0",
              env={"CONVLLAVA_EDGE_CACHE": str(cache_dir)})
    assert run.returncode == 0 and run.stdout.strip() == "3"
    stats = run.err_lines[-1]
    assert "first token after" in stats and "tokens/s" not in stats, stats
    assert re.search(r"; [1-7] tokens?$", stats), stats  # the count, not a rate, below 8 tokens


# -- encode --save writes exactly the path given, atomically -----------------------------
@pytest.mark.timeout(120)
def test_encode_save_writes_exactly_its_path(tmp_path, capsys):
    target = tmp_path / "embeddings"  # no .npy: np.save(name) wrote embeddings.npy
    assert main(["encode", str(EXAMPLE), "--model", str(DEMO_BUNDLE), "--save", str(target), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["saved"] == str(target) and f"written to {target}" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings"]
    first = np.load(target)
    assert first.ndim == 2 and first.dtype == np.float32
    target.chmod(0o640)
    assert main(["encode", str(EXAMPLE), "--model", str(DEMO_BUNDLE), "--save", str(target)]) == 0
    assert (target.stat().st_mode & 0o777) == 0o640 and np.array_equal(np.load(target), first)  # replaced, mode kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings"]  # no temporary file left


@pytest.mark.timeout(120)
def test_encode_save_refuses_devices_folders_and_fifos_before_any_work(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    had_full_npy = os.path.exists("/dev/full.npy")
    for bad, needle in (("/dev/full", "is a device"), (str(tmp_path), "is a folder"), (str(tmp_path / "fifo"), "is a FIFO")):
        one_line(capsys, main(["encode", str(EXAMPLE), "--model", str(DEMO_BUNDLE), "--save", bad]), bad, needle)
    assert os.path.exists("/dev/full.npy") == had_full_npy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


# -- chat with standard input closed -------------------------------------------------------
@pytest.mark.timeout(120)
def test_chat_with_stdin_closed_is_one_line(cache_dir):
    proc = subprocess.run(["bash", "-c", 'exec "$0" -m convllava_edge.cli.main chat "$1" <&-', sys.executable,
                           str(EXAMPLE)], capture_output=True, text=True, timeout=100,
                          env={**os.environ, "CONVLLAVA_EDGE_CACHE": str(cache_dir)})
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "standard input is closed" in lines[0], proc.stderr


# -- a valid manifest that names no default aspect, square count or rule ----------------------------
@pytest.mark.timeout(120)
def test_encode_and_info_read_a_manifest_without_its_optional_parts(tmp_path, capsys):
    bundle = copy_demo(tmp_path / "b")
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["preprocess"]["aspect"]  # optional: pad, as ConvLLaVA trained
    data["tokens_per_image"] = {"stride": data["tokens_per_image"]["stride"]}  # square and rule are optional too
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["info", str(bundle), "--no-verify"]) == 0, capsys.readouterr().err  # was "unexpected KeyError"
    assert "pad ->" in capsys.readouterr().out
    assert main(["encode", str(EXAMPLE), "--model", str(bundle), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["n_tokens"] > 0


# -- one default everywhere: the demo model without --model ------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_encode_takes_the_demo_model_without_model(capsys):
    assert main(["encode", str(EXAMPLE), "--json"]) == 0
    captured = capsys.readouterr()
    assert "using the demo model shipped with convllava-edge" in captured.err
    assert json.loads(captured.out)["n_tokens"] == 36  # the demo's 384 px: 6 x 6
