"""The bf16 vision type (the fp32 graph in bf16 arithmetic, measured at export) and `--vision-backend auto`
(the bundle's types timed on the backends here once; the fastest within the accuracy gate kept per bundle and
machine). Every timing here is injected: what auto picks is decided by the test, never by the machine's load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import openvino
import pytest

from convllava_edge.check import default_inputs, run_check
from convllava_edge.cli.main import main
from convllava_edge.errors import ExportError
from convllava_edge.export.bundle import ExportOptions, export_bundle
from convllava_edge.manifest import load_manifest
from convllava_edge.vision import VISION_GATE, candidates, choose_vision, within_gate

from support.synthetic_mini import write_tiny_llava_mini

HAS_BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "shapes-1.png")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 arithmetic: the refusal is tested instead")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path / "cache"))  # auto's records live beside the cache


@pytest.fixture(scope="module")
def bf16_bundle(tiny, tmp_path_factory):
    if not HAS_BF16:
        pytest.skip("this CPU has no bf16 arithmetic: test_bf16_export_is_refused_without_bf16 covers it")
    out = tmp_path_factory.mktemp("bf16") / "b"
    export_bundle(tiny.bin_ckpt, out, ExportOptions(vision_types=("bf16", "int8"), llm_type="F32"))
    return out


@needs_bf16
def test_bf16_ships_the_fp32_graph_once_with_its_measured_cosine(bf16_bundle):
    manifest = load_manifest(bf16_bundle)  # verifies every file's hash
    bf16, int8 = manifest.vision
    assert (bf16.variant, bf16.graph) == ("bf16", "vision-fp32.onnx") and "bf16 arithmetic" in bf16.method
    assert VISION_GATE["cosine_mean"] <= bf16.accuracy["cosine_mean"] < 1.0  # measured: bf16 rounding shows
    paths = [f.path for f in manifest.files]
    assert len(paths) == len(set(paths)) and set(bf16.files) <= set(paths)
    assert sorted(p.name for p in bf16_bundle.glob("*.onnx")) == ["vision-fp32.onnx", "vision-int8.onnx"]
    assert manifest.accuracy["vision_fp32_vs_pytorch"]  # the graph bf16 runs was validated against PyTorch


@needs_bf16
def test_check_runs_the_bf16_type_in_bf16_and_it_passes_the_gates(bf16_bundle):
    result = run_check(bf16_bundle, default_inputs(n_images=2))
    bf16 = result.vision["variants"]["bf16"]["embeds"]
    assert VISION_GATE["cosine_mean"] <= bf16["cosine_mean"] < 1.0  # against the same graph in fp32
    assert result.passed, [g.message() for g in result.gates if not g.passed]


@needs_bf16
def test_bf16_is_refused_on_onnx_runtime_and_auto_runs_it_on_openvino(bf16_bundle, own_cache, capsys):
    args = ["ask", EXAMPLE, "How many shapes are there?", "--model", str(bf16_bundle), "--json", "--max-tokens", "4",
            "--vision-type", "bf16"]
    assert main(args + ["--vision-backend", "onnxruntime"]) == 1
    assert "ONNX Runtime has no bf16 CPU kernels" in capsys.readouterr().err
    assert main(args + ["--vision-backend", "auto"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["vision_backend"], out["vision_type"]) == ("openvino", "bf16")
    assert out["vision_choice"]["how"] == "only candidate" and out["providers"] == ["OpenVINO CPU (bf16)"]


def test_bf16_export_is_refused_without_bf16(tiny, tmp_path, monkeypatch):
    """Where bf16 cannot run, no cosine can be measured, so none is written: one line, nothing left behind."""
    from convllava_edge.backends import vision_openvino

    class NoBf16Core(openvino.Core):
        def get_property(self, device, name):
            return ["FP32", "INT8"] if name == "OPTIMIZATION_CAPABILITIES" else super().get_property(device, name)

    monkeypatch.setattr(openvino, "Core", NoBf16Core)
    assert vision_openvino.openvino_available()
    out = tmp_path / "b"
    with pytest.raises(ExportError, match="--vision-type bf16 is measured at export.*needs a CPU with bf16"):
        export_bundle(tiny.bin_ckpt, out, ExportOptions(vision_types=("bf16",), llm_type="F32"))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def fake_timer(seconds: dict[str, float], calls: list[str]):
    def timer(label, encoder, pixels, best):
        calls.append(label)
        encoder.encode(pixels)  # the candidate really runs
        return seconds[label]
    return timer


def test_auto_times_each_candidate_once_keeps_the_fastest_and_reads_it_back(tiny_bundle, own_cache):
    manifest = load_manifest(tiny_bundle)  # fp32, fp16, int8: all within the gate
    pairs = {f"{e.variant}/{k}" for e, k in candidates(manifest, None, "cpu")}
    assert {"fp32/onnxruntime", "fp16/onnxruntime", "int8/onnxruntime", "int8/openvino"} <= pairs
    seconds = {label: 1.0 for label in pairs} | {"int8/openvino": 0.2, "fp16/onnxruntime": 0.5}
    calls: list[str] = []
    choice, encoder = choose_vision(tiny_bundle, manifest, None, "cpu", 2, "auto", timer=fake_timer(seconds, calls))
    assert (choice.entry.variant, choice.kind, choice.how) == ("int8", "openvino", "calibrated")
    assert sorted(calls) == sorted(pairs) and encoder.providers == ["OpenVINO CPU (fp32)"]
    calls.clear()
    again, _ = choose_vision(tiny_bundle, manifest, None, "cpu", 2, "auto", timer=fake_timer(seconds, calls))
    assert (again.entry.variant, again.kind, again.how, calls) == ("int8", "openvino", "cached", [])
    assert again.seconds == choice.seconds
    # another thread count is another measurement
    other, _ = choose_vision(tiny_bundle, manifest, None, "cpu", 1, "auto", timer=fake_timer(seconds, calls))
    assert other.how == "calibrated" and calls


def test_auto_with_a_type_asked_chooses_only_the_backend(tiny_bundle, own_cache):
    manifest = load_manifest(tiny_bundle)
    calls: list[str] = []
    choice, _ = choose_vision(tiny_bundle, manifest, "int8", "cpu", 2, "auto",
                              timer=fake_timer({"int8/onnxruntime": 0.1, "int8/openvino": 0.3}, calls))
    assert (choice.entry.variant, choice.kind) == ("int8", "onnxruntime") and sorted(calls) == ["int8/onnxruntime",
                                                                                                "int8/openvino"]
    # fp16 has no fast kernels on either CPU backend, but asked is asked: only the backend is chosen
    choice, _ = choose_vision(tiny_bundle, manifest, "fp16", "cpu", 2, "auto",
                              timer=fake_timer({"fp16/onnxruntime": 2.0, "fp16/openvino": 1.0}, calls))
    assert (choice.entry.variant, choice.kind) == ("fp16", "openvino")


def test_auto_never_picks_a_type_outside_the_gate_unasked(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    poor = dataclasses.replace(manifest.vision[2], accuracy={**manifest.vision[2].accuracy, "cosine_mean": 0.9})
    damaged = dataclasses.replace(manifest, vision=(manifest.vision[0], manifest.vision[1], poor))
    assert not within_gate(poor)
    assert {e.variant for e, _ in candidates(damaged, None, "cpu")} == {"fp32", "fp16"}
    assert {e.variant for e, _ in candidates(damaged, "int8", "cpu")} == {"int8"}  # asked: still runs


def test_pinned_backends_never_calibrate_and_say_so(tiny_bundle, own_cache, capsys):
    assert main(["ask", EXAMPLE, "How many shapes?", "--model", str(tiny_bundle), "--json", "--max-tokens", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the suite pins onnxruntime
    assert (out["vision_backend"], out["vision_type"], out["vision_choice"]["how"]) == ("onnxruntime", "fp32", "asked")


def test_info_and_doctor_say_what_auto_chose_here(tiny_bundle, own_cache, capsys):
    manifest = load_manifest(tiny_bundle)
    seconds = {f"{e.variant}/{k}": 1.0 for e, k in candidates(manifest, None, "auto")} | {"fp16/openvino": 0.1}
    choose_vision(tiny_bundle, manifest, None, "auto", None, "auto", timer=fake_timer(seconds, []))
    assert main(["info", str(tiny_bundle), "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert "vision here (auto): fp16 on openvino, calibrated" in " ".join(text.split())
    assert main(["info", str(tiny_bundle), "--no-verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vision_choice_here"]["vision_backend"] == "openvino" and "openvino" in info["vision_runs_on"]["int8"]
    assert main(["doctor", "--json", "--no-probe"]) == 0
    doctor = json.loads(capsys.readouterr().out)
    assert doctor["vision"]["default"] == "onnxruntime"  # the suite's pin
    assert [(c["bundle"], c["vision_type"], c["vision_backend"]) for c in doctor["vision"]["auto_choices"]] == \
        [(manifest.name, "fp16", "openvino")]


@needs_bf16
def test_llava_mini_bf16_measures_all_three_graphs(tmp_path):
    sft, clip = write_tiny_llava_mini(tmp_path / "mini")
    out = tmp_path / "b"
    export_bundle(sft, out, ExportOptions(vision_types=("bf16",), llm_type="F32"), vision_tower=clip)
    (bf16,) = load_manifest(out).vision
    assert set(bf16.accuracy) == {"clip", "compress", "prefusion"} and within_gate(bf16)
    assert all(p.endswith("-fp32.onnx") for p in bf16.parts.values())


def test_a_candidate_far_behind_after_its_first_run_is_not_timed_further():
    from convllava_edge import vision

    class Slow:
        def __init__(self):
            self.calls = 0

        def encode(self, pixels):
            self.calls += 1

    enc = Slow()
    assert vision._time_encode("x", enc, None, None) >= 0 and enc.calls == 1 + vision.CALIBRATION_RUNS
    enc = Slow()
    assert vision._time_encode("x", enc, None, 0.0) >= 0 and enc.calls == 1  # anything is 4x behind 0 s


@pytest.mark.timeout(240)
def test_a_first_ask_answers_at_once_and_the_timing_runs_after_it_in_the_background(tiny_bundle, own_cache,
                                                                                   monkeypatch, capsys):
    """A one-shot command on a new machine does not wait for auto's timing: the likely fastest pair answers,
    a low-priority process of its own times every candidate and records the choice, the next ask reads it."""
    import os
    import re
    import signal
    import time

    from convllava_edge.calibrate import CALIBRATE_ENV
    from convllava_edge.vision import cached_choice

    monkeypatch.setenv(CALIBRATE_ENV, "later")  # the one-shot commands' own default (the suite pins "now")
    args = ["ask", EXAMPLE, "How many shapes?", "--model", str(tiny_bundle), "--json", "--max-tokens", "2",
            "--vision-backend", "auto", "--device", "cpu"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    first, kind = candidates(load_manifest(tiny_bundle), None, "cpu")[0]
    assert (out["vision_type"], out["vision_backend"], out["vision_choice"]["how"]) == (first.variant, kind,
                                                                                         "provisional")
    assert "the others are timed after this answer" in captured.err
    pid = int(re.search(r"timing the vision candidates in the background \(process (\d+)", captured.err).group(1))
    assert captured.err.index("after this answer") < captured.err.index("(process ")
    deadline = time.monotonic() + 180
    try:
        while True:  # our child: main() ran in this process
            try:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break
            except ChildProcessError:  # reaped already (subprocess reaps the Popen objects it dropped)
                break
            assert time.monotonic() < deadline, "the background calibration did not finish in 180 s"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)  # its own session: nothing of it outlives the test
        except ProcessLookupError:
            pass
    record = cached_choice(load_manifest(tiny_bundle), "cpu", None)
    assert record is not None and len(record["calibration_s"]) == len(candidates(load_manifest(tiny_bundle), None, "cpu"))
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["vision_choice"]["how"] == "cached"
    assert (again["vision_type"], again["vision_backend"]) == (record["vision_type"], record["vision_backend"])
