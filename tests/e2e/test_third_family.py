"""A third model family, defined only in the tests, through export, encode, ask and check.

The family needed exactly two files, both under tests/support: toy_family.py (the runtime side: its graph
names, its encoder) and toy_family_export.py (the export side: its checkpoint, graph and template); both
are registered here as a plugin would register them. No product file names the toy: the test checks that
too. Its image becomes 4 rows placed after the question (its own template), so nothing can have assumed
ConvLLaVA's prompt layout either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import convllava_edge.export.families as export_families
import convllava_edge.families as families
from convllava_edge.cli.main import main
from convllava_edge.model import Model
from convllava_edge.prompt import ImageSlot

from support import toy_family, toy_family_export
from support.tiny import SPEC

ROOT = Path(__file__).resolve().parents[2]
FAMILY_FILES = {"tests/support/toy_family.py", "tests/support/toy_family_export.py"}


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    families.register(toy_family.FAMILY)
    export_families.register(toy_family_export.FAMILY)
    root = tmp_path_factory.mktemp("toy")
    ckpt = toy_family_export.write_toy_checkpoint(root / "toy-ckpt", SPEC)
    out = root / "bundle"
    assert main(["export", str(ckpt), "--out", str(out), "--vision-type", "fp32", "--vision-type", "int8",
                 "--llm-type", "Q8_0"]) == 0
    image = root / "picture.png"
    Image.new("RGB", (80, 60), (200, 30, 40)).save(image)
    yield out, image
    families.unregister(toy_family.FAMILY.name)  # this module's family: no other module sees it
    export_families.unregister(toy_family_export.FAMILY.name)


def test_the_toy_family_needed_only_its_two_files():
    mentions = [str(p.relative_to(ROOT)) for folder in ("convllava_edge", "export", "quantize", "check", "cli")
                for p in (ROOT / folder).rglob("*.py") if "toy" in p.read_text(encoding="utf-8").lower()]
    assert mentions == []
    assert all((ROOT / f).is_file() for f in FAMILY_FILES)


def test_a_toy_bundle_says_its_family_and_graphs(toy_bundle):
    out, _ = toy_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "toy" and [v["variant"] for v in manifest["vision"]] == ["fp32", "int8"]
    assert manifest["template"]["name"] == "toy" and manifest["tokens_per_image"]["square"] == 4


def test_encode_runs_the_toy_graph(toy_bundle, capsys):
    out, image = toy_bundle
    assert main(["encode", str(image), "--model", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_tokens"] == toy_family.ROWS and result["n_embd"] == SPEC.hidden_size
    assert result["pixel_shape"] == [1, 3, toy_family_export.SIZE, toy_family_export.SIZE]


def test_ask_places_the_image_after_the_question(toy_bundle, capsys):
    out, image = toy_bundle
    model = Model(out, device="cpu", cache=False)
    embedded = model.embed(str(image))
    items = model.prompt_items([("What colour?", None)], embedded.slot)
    at = items.index(embedded.slot)
    question = model.llm.tokenize("What colour?")
    text_before = [i for i in items[:at] if not isinstance(i, ImageSlot)]
    assert any(text_before[k:k + len(question)] == question for k in range(len(text_before)))
    assert embedded.slot.n_tokens == toy_family.ROWS
    model.close()
    assert main(["ask", str(image), "What colour?", "--model", str(out), "--json", "--temperature", "0",
                 "--max-tokens", "6", "--no-cache"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["n_image_tokens"] == toy_family.ROWS and answer["n_prompt_positions"] == len(items) - 1 + 4


def test_check_measures_the_toy_bundle_stage_by_stage(toy_bundle, tmp_path, capsys):
    out, image = toy_bundle
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(image), "question": "What colour?", "answer": "red"}) + "\n")
    code = main(["check", str(out), "--questions", str(questions), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and result["reference"]["kind"] == "self"
    assert set(result["vision"]["variants"]) == {"int8"}  # fp32 is the reference itself
    assert set(result["answers"]["combinations"]) == {"fp32 + Q8_0", "int8 + Q8_0"}
    assert result["inputs"]["scoring"] == "exact match"  # a user's questions: scored by exact match
