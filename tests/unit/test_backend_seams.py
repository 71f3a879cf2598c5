"""The backend seams, proved as the family seam is: two backends defined only in the tests (support/toy_backends.py)
are registered, chosen by name through RuntimeOptions and through the command line, and run; no product file names
them, and nothing outside backends/ branches on a backend's name (tools/layout.py, tests/unit/test_layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import toy_backends
from support.toy_backends import LLM, VISION, ToyLlm, ToyVision

from convllava_edge.backends import (llm_kind, register_llm, register_vision, unregister_llm, unregister_vision,
                                     vision_kind, vision_kinds)
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.cache import DiskCache
from convllava_edge.cli.main import main
from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.errors import ConfigError
from convllava_edge.model import AskOptions, Model
from convllava_edge.runtime import RuntimeOptions

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
GREEDY = AskOptions(max_tokens=16, sampling=SamplingOptions(temperature=0.0))


@pytest.fixture
def toys():
    vision, llm = register_vision(ToyVision()), register_llm(ToyLlm())
    yield vision, llm
    unregister_vision(VISION)
    unregister_llm(LLM)


def test_registered_backends_are_chosen_by_name_and_run(toys, tmp_path):
    vision, llm = toys
    model = Model(DEMO_BUNDLE, RuntimeOptions(device="cpu", threads=1, vision_backend=VISION, llm_backend=LLM,
                                              cache=DiskCache(tmp_path)))
    answer = model.ask(EXAMPLE, "How many shapes are there?", GREEDY)
    assert answer.text == "3 shapes" and answer.n_image_tokens == 36
    assert vision.runs and llm.opened == [DEMO_BUNDLE]
    assert model.vision_backend == VISION and model.vision_providers[0] == "toy"
    assert model.images.graph_sha.endswith(f"|{VISION}|fp32")  # its results are cached apart from ONNX Runtime's
    assert "LLM on CPU (fake)" in model.note


def test_the_command_line_takes_a_registered_backend(toys, capsys):
    vision, llm = toys
    code = main(["ask", str(EXAMPLE), "How many shapes?", "--model", str(DEMO_BUNDLE), "--device", "cpu",
                 "--vision-backend", VISION, "--llm-backend", LLM, "--temperature", "0", "--no-cache"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == "3 shapes" and vision.runs


def test_auto_times_a_registered_local_backend_too(toys):
    assert VISION in [k.name for k in vision_kinds()]
    assert vision_kind(VISION).can_run("fp32", "cpu") and not vision_kind(VISION).can_run("bf16", "cpu")


def test_unregistered_they_are_unknown_by_name(tmp_path):
    with pytest.raises(ConfigError, match=f"unknown LLM backend '{LLM}' \\(known: llama.cpp, vllm\\)"):
        RuntimeOptions(llm_backend=LLM).validate()
    with pytest.raises(ConfigError, match=f"unknown vision backend '{VISION}'"):
        vision_kind(VISION)
    with pytest.raises(ConfigError, match="unknown LLM backend"):
        llm_kind(LLM)


def test_no_product_file_names_the_test_backends():
    product = [p for folder in ("convllava_edge", "export", "quantize", "check", "cli") for p in (ROOT / folder).rglob("*.py")]
    assert product and not [p for p in product if VISION in p.read_text() or LLM in p.read_text()]
    assert toy_backends.__file__.startswith(str(ROOT / "tests"))
