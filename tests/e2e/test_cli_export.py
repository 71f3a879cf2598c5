"""The export/info/lint/encode commands: exit codes, exact error lines, atomic bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convllava_edge.backends.vision_ort import CPU
from convllava_edge.cli.main import main
from convllava_edge.manifest import MANIFEST_NAME

CLI = [sys.executable, "-m", "convllava_edge.cli.main"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600)


def test_main_returns_clean_error_for_missing_checkpoint(tmp_path, capsys):
    code = main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}/config.json: file not found\n"
    assert not (tmp_path / "b").exists()


def test_export_refuses_to_overwrite_and_force_replaces(tiny, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("export", tiny.bin_ckpt, "--out", out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {out} already exists (use --force to replace it)"
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli("export", tiny.bin_ckpt, "--out", out, "--force")  # --force replaces bundles only
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: {out} is not a convllava-edge bundle "
                                                      "(no manifest.json); --force only replaces bundles")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose: --force may replace it
    result = run_cli("export", tiny.bin_ckpt, "--out", out, "--force", "--json")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    # the default ships int8 alone (within the vision gate on this checkpoint): the fp32 reference is not kept
    assert manifest["family"] == "convllava" and [v["variant"] for v in manifest["vision"]] == ["int8"]
    assert not (out / "vision-fp32.onnx").exists()
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_failed_export_leaves_existing_bundle_untouched(tiny, tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny.bin_ckpt, broken)
    index = json.loads((broken / "pytorch_model.bin.index.json").read_text())
    shard = broken / index["weight_map"]["model.mm_projector.0.weight"]
    shard.write_bytes(shard.read_bytes()[:2000])
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    result = run_cli("export", broken, "--out", out, "--force")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {shard}: cannot read PyTorch weights")
    assert "Traceback" not in result.stderr
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args,message", [
    (["--vision-type", "int4"], "unknown vision type 'int4' (known: fp32, fp16, int8, bf16)"),
    (["--vision-type", "fp16", "--calibration-images", "."], "--calibration-images only applies to --vision-type int8"),
])
def test_bad_export_options(tiny, tmp_path, args, message, capsys):
    assert main(["export", str(tiny.bin_ckpt), "--out", str(tmp_path / "b"), *args]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_info_verifies_hashes(tiny_bundle, tmp_path, capsys):
    assert main(["info", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is True and info["n_embd"] == 256
    altered = tmp_path / "altered"
    shutil.copytree(tiny_bundle, altered)
    graph = altered / "vision-fp16.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert main(["info", str(altered)]) == 1
    assert capsys.readouterr().err == f"error: {graph}: SHA-256 does not match the manifest (altered)\n"


def test_manifest_paths_cannot_leave_the_bundle(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "evil"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for bad in ("../outside.onnx", "/etc/passwd"):
        manifest["files"][0]["path"] = bad
        manifest["vision"][0]["graph"] = bad
        manifest["vision"][0]["files"] = [bad]
        (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
        assert main(["info", str(bundle)]) == 1
        assert f"file name {bad!r} points outside the bundle" in capsys.readouterr().err


def test_symlink_out_of_the_bundle_is_refused(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "linked"
    shutil.copytree(tiny_bundle, bundle)
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "vision-fp16.onnx", outside)
    (bundle / "vision-fp16.onnx").unlink()
    os.symlink(outside, bundle / "vision-fp16.onnx")
    assert main(["info", str(bundle)]) == 1
    assert "symbolic link leads outside the bundle" in capsys.readouterr().err


def test_lint_command(tiny_bundle, capsys):
    assert main(["lint", str(tiny_bundle / "vision-fp32.onnx")]) == 0
    assert "=> TensorRT-ready" in capsys.readouterr().out
    assert main(["lint", str(tiny_bundle / "vision-int8.onnx"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["op_counts"]["MatMulInteger"] > 0


def test_encode_command(tiny_bundle, tmp_path, capsys):
    image = Path(__file__).parents[2] / "examples" / "probe.jpg"
    save = tmp_path / "e.npy"
    assert main(["encode", str(image), "--model", str(tiny_bundle), "--vision-type", "fp16", "--aspect", "native",
                 "--save", str(save), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vision_type"] == "fp16" and result["providers"] == [CPU]
    h, w = result["pixel_shape"][2:]
    assert result["n_tokens"] == (h // 64) * (w // 64) and w > h  # the example is 640x480: a wide grid
    import numpy as np
    assert np.load(save).shape == (result["n_tokens"], 256)


def test_usage_errors_exit_2(capsys):
    assert main(["export"]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_runtime_never_imports_torch(tiny_bundle):
    code = (
        "import sys, json\n"
        "import convllava_edge, convllava_edge.image, convllava_edge.preprocess, convllava_edge.vision\n"
        "import convllava_edge.manifest, convllava_edge.metrics, convllava_edge.cli.main\n"
        "from convllava_edge.cli.main import main\n"
        f"assert main(['encode', {str(Path(__file__).parents[2] / 'examples' / 'probe.jpg')!r}, '--model', {str(tiny_bundle)!r}, '--json']) == 0\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m.startswith('transformers')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def _default_result(int8_accuracy: dict | None):
    from convllava_edge.export.families import ShippedVision, VisionResult
    from convllava_edge.preprocess import PreprocessConfig
    from convllava_edge.prompt import VICUNA_V1

    fp32 = ShippedVision("fp32", [Path("vision-fp32.onnx"), Path("vision-fp32.onnx.data")], "fp32", True)
    int8 = ShippedVision("int8", [Path("vision-int8.onnx")], "dynamic int8", True, int8_accuracy)
    return VisionResult(vision=[int8, fp32], unshipped=[Path("other.onnx")],
                        preprocess=PreprocessConfig(image_size=64, crop_size=(64, 64), stride=64), n_embd=8,
                        tokens_per_image={}, tower={}, template=VICUNA_V1, accuracy={}, notes=[])


class _Stages:
    def __init__(self):
        self.said: list[str] = []

    def stage(self, label: str) -> None:
        self.said.append(label)

    def advance(self, done: int, total: int) -> None:
        pass


@pytest.mark.parametrize("mean,low,ships", [
    (0.999, 0.97, ["int8"]),  # within the gate: int8 alone, fp32's files removed with the other unshipped ones
    (0.99, 0.95, ["int8"]),  # the gate's own figures pass (>=, as check's gate)
    (0.985, 0.97, ["fp32", "int8"]),  # mean under the gate: fp32 ships first, is the default
    (0.999, 0.90, ["fp32", "int8"]),  # one poor token under the gate's minimum
    (None, None, ["fp32", "int8"]),  # not measured: never the default unasked
])
def test_the_default_ships_int8_alone_only_within_the_vision_gate(mean, low, ships):
    from convllava_edge.export.bundle import default_types

    progress = _Stages()
    result = default_types(_default_result(None if mean is None else {"cosine_mean": mean, "cosine_min": low}),
                           progress)
    assert [v.variant for v in result.vision] == ships
    fp32_files = [Path("vision-fp32.onnx"), Path("vision-fp32.onnx.data")]
    if ships == ["int8"]:
        assert result.unshipped == [Path("other.onnx"), *fp32_files] and result.notes == [] and progress.said == []
    else:
        assert result.unshipped == [Path("other.onnx")]
        assert len(result.notes) == 1 and result.notes[0].endswith("so fp32 ships first and is the default")
        assert result.notes[0].startswith("int8 cosine mean ") and progress.said == result.notes


def test_the_default_export_passes_checks_vision_gate_against_the_checkpoint(tiny, exported, capsys):
    bundle = exported(tiny.bin_ckpt)  # no vision type asked: the default
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert [v["variant"] for v in manifest["vision"]] == ["int8"]
    code = main(["check", str(bundle), "--reference", str(tiny.bin_ckpt), "--no-nf4", "--json"])
    result = json.loads(capsys.readouterr().out)
    vision_gates = [g for g in result["gates"] if g["stage"] == "vision"]
    assert {"vision.cosine_mean", "vision.cosine_min"} <= {g["name"] for g in vision_gates}
    assert all(g["passed"] for g in vision_gates), vision_gates
    # The LLM's Q4_K_M gates are the LLM's (unchanged by this default): on a two-layer random Llama 4 bits move
    # the logits far more than on a trained one
    failed = {g["stage"] for g in result["gates"] if not g["passed"]}
    assert "vision" not in failed and code == (1 if failed else 0)
