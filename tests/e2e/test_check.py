"""convllava-edge check: identical variants measure as identical, damaged ones fail the gates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from convllava_edge.cli.main import main
from convllava_edge.errors import ConfigError
from convllava_edge.export.bundle import ExportOptions, export_bundle
from convllava_edge.check import default_inputs, parse_gates, run_check, write_report

from convllava_edge.export.convllava import synthetic as S
from support.tiny import SPEC

SMALL = dict(n_images=2)  # 2 demo scenes x 3 questions keep the suite fast


@pytest.fixture(scope="module")
def reference_bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("fp32", "fp16"), llm_type="F32")


@pytest.fixture(scope="module")
def damaged_bundle(tiny, tmp_path_factory):
    """The same model with noise added to the projector and every LLM matrix (~50% of their scale)."""
    root = tmp_path_factory.mktemp("damaged")
    gen = torch.Generator().manual_seed(9)
    vision = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=gen)) if k.startswith("mm_projector.") and v.ndim == 2
              else v for k, v in tiny.vision_state.items()}
    llm = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=gen)) if v.ndim == 2 else v
           for k, v in S.random_llama_state(SPEC, seed=1).items()}
    ckpt = S.write_convllava_checkpoint(root / "ck", SPEC, S.TINY_TOWER, vision_state=vision, llm_state=llm, shards=1)
    shutil.copy(tiny.bin_ckpt / "tokenizer.model", ckpt / "tokenizer.model")
    shutil.copy(tiny.bin_ckpt / "tokenizer_config.json", ckpt / "tokenizer_config.json")
    out = root / "bundle"
    export_bundle(ckpt, out, ExportOptions(vision_types=("fp32",), llm_type="F32"))
    return out


def test_identical_variants_measure_as_identical(reference_bundle):
    result = run_check(reference_bundle, default_inputs(**SMALL), reference_path=reference_bundle)
    fp32 = result.vision["variants"]["fp32"]["embeds"]
    assert fp32["cosine_mean"] == pytest.approx(1.0, abs=1e-12) and fp32["rel_l2"] == 0.0
    assert result.vision["variants"]["fp16"]["embeds"]["cosine_min"] >= 0.999
    llm = result.llm["variants"]["F32"]
    assert llm["kl_mean"] == pytest.approx(0.0, abs=1e-9) and llm["top1"] == 1.0
    for combo, figures in result.answers["combinations"].items():
        assert figures["first_token"] == 1.0, combo
    assert result.answers["combinations"]["fp32 + F32"]["exact"] == 1.0
    assert result.passed, [g.message() for g in result.gates if not g.passed]


def test_damaged_variant_fails_the_gates_by_name(damaged_bundle, reference_bundle, capsys):
    code = main(["check", str(damaged_bundle), "--reference", str(reference_bundle), "--json"])
    assert code == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["passed"] is False
    failed = {(g["stage"], g["name"]) for g in result["gates"] if not g["passed"]}
    assert ("vision", "vision.cosine_mean") in failed and ("llm", "llm.kl_mean") in failed
    lines = [line for line in captured.err.splitlines() if line.startswith("gate failed:")]
    assert any(line.startswith("gate failed: vision fp32: cosine_mean ") for line in lines)
    assert any(line.startswith("gate failed: llm F32: kl_mean ") for line in lines)


def test_gates_can_be_loosened_to_pass(damaged_bundle, reference_bundle, capsys):
    loose = ["vision.cosine_mean=-1", "vision.cosine_min=-1", "vision.rel_l2=100", "llm.kl_mean=100", "llm.kl_p99=100",
             "llm.top1=0", "answers.first_token=0", "answers.exact=0", "answers.accuracy_drop=1"]
    args = ["check", str(damaged_bundle), "--reference", str(reference_bundle), "--json"]
    assert main(args + [x for g in loose for x in ("--gate", g)]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True


def test_json_and_report_shapes(reference_bundle, tmp_path):
    result = run_check(reference_bundle, default_inputs(**SMALL), reference_path=reference_bundle)
    data = result.to_dict()
    assert set(data) == {"bundle", "reference", "inputs", "vision", "llm", "answers", "sizes", "passed", "gates"}
    assert set(data["vision"]) == {"reference", "variants"}
    assert set(data["vision"]["variants"]["fp16"]) == {"features", "embeds"}
    assert set(data["vision"]["variants"]["fp16"]["embeds"]) == {"cosine_mean", "cosine_min", "rel_l2", "max_abs_diff",
                                                                 "n_tokens"}
    assert set(data["llm"]["variants"]["F32"]) == {"kl_mean", "kl_p99", "top1", "n_positions"}
    assert set(data["answers"]) == {"reference", "reference_accuracy", "combinations"}
    assert set(data["answers"]["combinations"]["fp16 + F32"]) == {"exact", "first_token", "accuracy", "accuracy_drop"}
    assert set(data["gates"][0]) == {"name", "stage", "subject", "value", "threshold", "passed"}
    json.dumps(data)  # everything serialises
    report, chart = write_report(result, tmp_path / "report")
    text = report.read_text()
    for heading in ("## Vision", "## LLM", "## Answers", "## Gates"):
        assert heading in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(chart) as im:
        im.verify()


def test_checkpoint_reference_with_the_nf4_baseline(tiny, reference_bundle, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the red circle is on the left and the blue square is on the right."] * 20))
    inputs = default_inputs(n_images=1)
    from convllava_edge.check import load_inputs
    inputs.text = load_inputs(None, None, text).text
    result = run_check(reference_bundle, inputs, reference_path=tiny.bin_ckpt)
    assert result.reference["kind"] == "checkpoint" and result.vision["reference"].startswith("PyTorch fp32")
    # the bundle's fp32 graph against the PyTorch module: export validation's tolerance, as cosine
    assert result.vision["variants"]["fp32"]["embeds"]["cosine_min"] > 0.99999
    f32, nf4 = result.llm["variants"]["F32"], result.llm["variants"]["bnb-nf4"]
    assert f32["kl_mean"] < 1e-4 and f32["top1"] == 1.0  # F32 GGUF vs transformers: float noise only
    assert nf4["kl_mean"] > f32["kl_mean"]  # 4-bit weights cost something, and it is measured
    assert abs(f32["perplexity_change"]) < 1e-3 and np.isfinite(nf4["perplexity"])
    assert "fp32 + bnb-nf4" in result.answers["combinations"]


def test_questions_file_and_bad_gates(reference_bundle, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (250, 200), (240, 240, 240)).save(image)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"image": "a.png", "question": "How many shapes are there?", "answer": "0"}) + "\n")
    assert main(["check", str(reference_bundle), "--questions", str(q), "--json", "--gate", "answers.accuracy_drop=1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["n_questions"] == 1 and data["reference"]["kind"] == "self"
    assert data["llm"]["reference"] is None  # no LLM reference without --reference: said, not faked
    with pytest.raises(ConfigError, match="unknown gate 'vision.speed'"):
        parse_gates(["vision.speed=1"])
    assert main(["check", str(reference_bundle), "--gate", "llm.top1"]) == 1
    assert "expected NAME=VALUE" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["check", str(reference_bundle), "--questions", str(bad)]) == 1
    assert f"{bad}:1: expected" in capsys.readouterr().err


def test_checkpoint_reference_uses_the_tower_the_bundle_was_exported_from(tiny, tmp_path, capsys):
    """A released sft folder has no preprocessor_config.json and no mm_vision_resolution: the shards'
    tower copy cannot tell its resolution, so check needs the tower folder: --vision-tower, or the one
    the manifest recorded at export."""
    from convllava_edge.errors import CheckpointError
    from convllava_edge.manifest import MANIFEST_NAME

    ckpt = tmp_path / "sft"
    shutil.copytree(tiny.bin_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_vision_tower"] = "local/convnext-tower"  # no resolution in the name either
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "bundle"
    export_bundle(ckpt, out, ExportOptions(vision_types=("fp32",), llm_type="F32"), vision_tower=tiny.tower)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"]["vision_tower"] == str(tiny.tower.resolve())
    inputs = default_inputs(n_images=1)
    recorded = run_check(out, inputs, reference_path=ckpt, nf4=False)
    assert str(tiny.tower.resolve()) in recorded.vision["reference"]
    assert recorded.vision["variants"]["fp32"]["embeds"]["cosine_min"] > 0.99999  # the graph vs that tower in PyTorch
    del manifest["source"]["vision_tower"]
    manifest["source"]["notes"] = []
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="--vision-tower"):
        run_check(out, inputs, reference_path=ckpt, nf4=False)
    code = main(["check", str(out), "--reference", str(ckpt), "--vision-tower", str(tiny.tower), "--no-nf4",
                 "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"] and str(tiny.tower) in result["vision"]["reference"]
    assert main(["check", str(out), "--vision-tower", str(tiny.tower)]) == 1  # goes with --reference CHECKPOINT
