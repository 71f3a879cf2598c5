"""The OpenVINO vision backend (the `openvino` extra, in the test extra): the bundle's ONNX graphs run
as they run on ONNX Runtime, with the arithmetic stated, never chosen by the plugin (its CPU default is
bf16 wherever the CPU has bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino
import pytest

from convllava_edge.backends import open_vision_backend
from convllava_edge.cli.main import main
from convllava_edge.errors import ConfigError
from convllava_edge.manifest import load_manifest
from convllava_edge.vision import open_encoder

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "shapes-1.png")
FP32_TOLERANCE = 1e-4  # relative to the output's scale: summation order only, as export validates fp32 graphs
HAS_BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 256, 256)).astype(np.float32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_fp32_on_openvino_is_fp32_arithmetic(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    ort = open_encoder(tiny_bundle, manifest, "fp32", "cpu", 2)
    ov = open_encoder(tiny_bundle, manifest, "fp32", "cpu", 2, kind="openvino")
    assert ov.providers == ["OpenVINO CPU (fp32)"] and "OpenVINO" in ov.note
    for seed in range(3):
        x = pixels(seed)
        (f_ort, e_ort), (f_ov, e_ov) = ort.encode_both(x), ov.encode_both(x)
        assert rel(e_ov, e_ort) < FP32_TOLERANCE and rel(f_ov, f_ort) < FP32_TOLERANCE


def test_bf16_arithmetic_is_asked_for_explicitly_and_refused_where_the_cpu_has_none(tiny_bundle):
    graph = tiny_bundle / load_manifest(tiny_bundle).vision_entry("fp32").graph
    if not HAS_BF16:
        with pytest.raises(ConfigError, match="needs a CPU with bf16 arithmetic"):
            open_vision_backend("cpu", 2, "openvino", precision="bf16")
        return
    runs = {p: open_vision_backend("cpu", 2, "openvino", precision=p).load(graph, ["pixel_values"], ["image_embeds"])
            .run(["image_embeds"], {"pixel_values": pixels()})[0] for p in ("fp32", "bf16")}
    reference = open_vision_backend("cpu", 2).load(graph, ["pixel_values"], ["image_embeds"]).run(
        ["image_embeds"], {"pixel_values": pixels()})[0]
    # bf16's 8-bit mantissa shows (rounding ~4e-3 per op); fp32 stays at summation order
    assert rel(runs["bf16"], reference) > 10 * rel(runs["fp32"], reference)
    cos = (runs["bf16"] * reference).sum(-1) / np.linalg.norm(runs["bf16"], axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cos.min() > 0.99


def test_onnx_runtime_refuses_bf16_by_name():
    with pytest.raises(ConfigError, match="ONNX Runtime has no bf16 CPU kernels.*--vision-backend openvino"):
        open_vision_backend("cpu", 1, "onnxruntime", precision="bf16")


def test_ask_on_openvino_answers_as_on_onnx_runtime_and_says_which_ran(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    answers = {}
    for backend in ("onnxruntime", "openvino"):
        assert main(["ask", EXAMPLE, "How many shapes are there?", "--json", "--temperature", "0",
                     "--vision-backend", backend]) == 0
        answers[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answers["openvino"]["vision_backend"] == "openvino" and answers["openvino"]["providers"] == ["OpenVINO CPU (fp32)"]
    assert answers["openvino"]["token_ids"] == answers["onnxruntime"]["token_ids"]
    assert not answers["openvino"]["cache_hit"]  # another backend's embeddings are not this one's


def test_openvino_cannot_take_cuda():
    with pytest.raises(ConfigError, match="--device cuda needs --vision-backend onnxruntime"):
        open_vision_backend("cuda", 1, "openvino")


CLASH = """
import numpy as np, llama_cpp
from convllava_edge.default_model import default_bundle
from convllava_edge.manifest import load_manifest
from convllava_edge.backends import open_vision_backend
from convllava_edge.families.convllava import CONVLLAVA
b = default_bundle(); m = load_manifest(b)
llm = llama_cpp.Llama(str(b / m.llm.file), n_ctx=128, verbose=False)  # extra buffer types on: AMX where built
list(zip(range(4), llm.generate(llm.tokenize(b"USER: hi"), temp=0.0)))
backend = open_vision_backend("cpu", 2, "openvino", precision="bf16" if {precision!r} == "bf16" else "fp32")
backend.load(b / m.vision[0].graph, *CONVLLAVA.graphs["vision"]).run(
    ["image_embeds"], {{"pixel_values": np.zeros((1, 3, 256, 256), np.float32)}})
llm.reset()
print(len(list(zip(range(4), llm.generate(llm.tokenize(b"USER: hello there"), temp=0.0)))))
"""


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_llama_cpp_runs_after_openvino_in_the_same_process(precision):
    """A chat's order: the LLM answers, OpenVINO encodes, the LLM answers again. OpenVINO's AMX kernels left their
    tile configuration on the calling thread and llama.cpp's AMX path died (SIGILL) until OpenVINO got a thread
    of its own; a child process, so that a crash fails this test instead of ending the run."""
    if precision == "bf16" and not HAS_BF16:
        pytest.skip("no bf16 on this CPU: its fp32 case runs")
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", CLASH.format(precision=precision)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "4", (run.returncode, run.stderr[-2000:])
