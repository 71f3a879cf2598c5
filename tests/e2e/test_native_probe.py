"""No signal death from llama.cpp: the CPU-path probe, its fault injection, the trial load, and doctor.

CI's llama.cpp build never traps, so the probe's fallback is shown by making the probe child raise
SIGILL itself (PROBE_FAULT_ENV, a test-only hook): ``ask`` on the demo must still answer "3".
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess

import pytest

from convllava_edge import machine, native
from convllava_edge.cache import ROOT_NAME
from convllava_edge.records import RECORDS
from convllava_edge.errors import BundleError

from support.cli_runs import EXAMPLE, cli, copy_demo, gguf_of, patch_gguf_scalar

QUESTION = "How many shapes are there?"
NOTICE = "crashed a probe with SIGILL"


def _ask(cache, *extra, env=None):
    return cli("ask", str(EXAMPLE), QUESTION, "--temperature", "0", "--no-cache", *extra,
               env={"CONVLLAVA_EDGE_CACHE": str(cache), **(env or {})})


@pytest.mark.timeout(300)
def test_a_probe_that_dies_from_sigill_means_ask_still_answers_and_says_so_once(tmp_path):
    cache = tmp_path / "cache"
    first = _ask(cache, env={native.PROBE_FAULT_ENV: "SIGILL"})
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "3"
    assert first.stderr.count(NOTICE) == 1, first.stderr
    records = list((cache / ROOT_NAME / RECORDS).glob("probe-*.json"))
    assert len(records) == 1
    saved = json.loads(records[0].read_text())
    assert saved["extra_bufts"] is False and saved["signal"] == "SIGILL"

    # --json says how the LLM was loaded
    as_json = _ask(cache, "--json", env={native.PROBE_FAULT_ENV: "SIGILL"})
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["llm_extra_buffer_types"] is False

    # a second run without the fault reads the cached verdict: had the probe run again here, it would
    # have passed (CI's build does not trap) and no notice would appear
    second = _ask(cache)
    assert second.returncode == 0 and second.stdout.strip() == "3"
    assert second.stderr.count(NOTICE) == 1, second.stderr
    assert json.loads(_ask(cache, "--json").stdout)["llm_extra_buffer_types"] is False


@pytest.mark.timeout(300)
def test_a_clean_probe_leaves_the_choice_to_the_measured_plan(tmp_path):
    run = _ask(tmp_path / "cache", "--json")
    assert run.returncode == 0 and NOTICE not in run.stderr
    saved = json.loads(next((tmp_path / "cache" / ROOT_NAME / RECORDS).glob("probe-*.json")).read_text())
    assert saved["extra_bufts"] is True and saved["signal"] is None
    # the demo's Q4_K_M file: extra buffer types off with an AVX-512 build (measured slower), on otherwise
    answer = json.loads(run.stdout)
    settings = answer["llm_settings"]
    expected = "AVX512" not in machine.build_features()
    assert settings["weight_type"] == "Q4_K" and answer["llm_extra_buffer_types"] is expected
    assert settings["extra_bufts"] is expected and settings["kv_type"] == "f16" and settings["n_ubatch"] > 0
    # one question: the context holds this prompt and the longest answer (512 by default), and no more
    # than that rounded up to 256, below the demo's trained 2048
    assert answer["n_prompt_positions"] + 512 <= settings["n_ctx"] < 2048 and settings["n_ctx"] % 256 == 0
    assert answer["answer"] == "3"


def test_load_plan_follows_the_weight_type_and_the_build(monkeypatch):
    monkeypatch.setattr(native, "cpu_paths_verdict", lambda run=True: native.Verdict(True, "ran in a probe"))
    monkeypatch.setattr(native, "build_features", lambda: frozenset({"AVX2", "AVX512", "AMX_INT8"}))
    plan = native.load_plan(EXAMPLE, "Q4_K")
    assert plan.extra_bufts is False and "Q4_K" in plan.reason and "AVX512" in plan.reason
    assert native.load_plan(EXAMPLE, "Q4_0").extra_bufts is True
    assert native.load_plan(EXAMPLE, "Q8_0").extra_bufts is True  # not measured: llama.cpp's default
    monkeypatch.setattr(native, "build_features", lambda: frozenset({"AVX2"}))  # repacked q4_K wins there
    assert native.load_plan(EXAMPLE, "Q4_K").extra_bufts is True
    crashed = native.Verdict(False, "crashed a probe with SIGILL", "SIGILL")
    monkeypatch.setattr(native, "cpu_paths_verdict", lambda run=True: crashed)
    assert native.load_plan(EXAMPLE, "Q4_0") == native.LoadPlan(False, crashed.reason)


@pytest.mark.timeout(300)
def test_trial_load_turns_a_llama_cpp_abort_into_one_line(tmp_path, monkeypatch):
    """Past the header checks (called directly here), llama.cpp aborts on block_count 100000: the trial
    load's child dies, the parent raises BundleError and lives."""
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    bundle = copy_demo(tmp_path / "b")
    gguf = gguf_of(bundle)
    patch_gguf_scalar(gguf, "llama.block_count", "I", 100000)
    with pytest.raises(BundleError) as e:
        native.trial_load(gguf, extra_bufts=False)
    message = str(e.value)
    assert str(gguf) in message and "\n" not in message
    assert "SIGABRT" in message or "SIGSEGV" in message or "cannot load" in message
    assert not list((tmp_path / "cache" / ROOT_NAME / RECORDS).glob("trial-*.json"))  # a failure is not cached


@pytest.mark.timeout(300)
def test_trial_load_success_is_cached_per_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    shutil.copy(native.probe_model(), gguf)
    calls = []
    real = native._run_child
    monkeypatch.setattr(native, "_run_child", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert native.trial_load(gguf, extra_bufts=False) is False
    assert native.trial_load(gguf, extra_bufts=False) is False
    assert len(calls) == 1  # the second load read the record
    os.utime(gguf, ns=(1, 1))  # another file as far as the stat-based identity knows
    native.trial_load(gguf, extra_bufts=False)
    assert len(calls) == 2


@pytest.mark.timeout(300)
def test_doctor_json_reports_this_machine(tmp_path):
    run = cli("doctor", "--json", env={"CONVLLAVA_EDGE_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["ok"] is True
    cpu = r["cpu"]
    assert cpu["model"] and cpu["cores"] >= 1 and set(machine.cpu_info()["flags"]) == set(cpu["flags"])
    assert cpu["features"]["avx2"] is ("avx2" in cpu["flags"])
    llm = r["llama_cpp"]
    assert llm["ok"] is True and llm["version"] == "0.3.36" and "CPU" in llm["system_info"]
    assert len(llm["library_sha256"]) == 64 and any("llama" in name for name in llm["libraries"])
    assert "SSE3" in llm["build_features"] and all(f"{f} = 1" in llm["system_info"] for f in llm["build_features"])
    from convllava_edge.buildflags import cmake_args, cpu_flags

    assert llm["fast_build_cmake_args"] == " ".join(cmake_args(cpu_flags()))
    assert "-DGGML_NATIVE=OFF" in llm["fast_build_cmake_args"]
    assert not set(llm["unused_cpu_features"]) & set(llm["build_features"])
    assert llm["probe"]["extra_buffer_types"] is True and llm["probe"]["cached"] is False  # CI's build does not trap
    ort = r["onnxruntime"]
    assert ort["ok"] is True and "CPUExecutionProvider" in ort["providers"] and ort["version"]
    assert isinstance(r["gpu"]["devices"], list)
    assert r["cache"]["folder"].startswith(str(tmp_path)) and r["cache"]["entries"] == 0
    assert r["versions"]["convllava-edge"] and r["versions"]["numpy"]
    # the verdict is kept: a second doctor reads it
    again = json.loads(cli("doctor", "--json", env={"CONVLLAVA_EDGE_CACHE": str(tmp_path / "cache")}).stdout)
    assert again["llama_cpp"]["probe"]["cached"] is True
    table = cli("doctor", env={"CONVLLAVA_EDGE_CACHE": str(tmp_path / "cache")})
    assert table.returncode == 0 and "ready" in table.stdout and "llama.cpp" in table.stdout


def test_fast_build_flags_follow_the_cpu_and_take_amx_only_with_the_fix():
    from convllava_edge.buildflags import AMX_FIX, cmake_args, missing_from_build

    xeon = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512cd", "avx512vl", "avx512dq",
            "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
    args = cmake_args(xeon)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_BF16=ON" in args
    assert "-DGGML_AMX_INT8=ON" in args and "-DGGML_AMX_TILE=ON" in args
    assert f"-DCMAKE_CXX_FLAGS=-include{AMX_FIX}" in args  # AMX never without the tile-configuration fix
    no_amx = cmake_args(xeon, amx=False)
    assert not any("AMX" in a and a.endswith("ON") for a in no_amx) and not any("include" in a for a in no_amx)
    epyc = xeon - {"amx_tile", "amx_int8", "amx_bf16"}
    assert not any("AMX" in a and a.endswith("ON") for a in cmake_args(epyc))
    assert not any("include" in a for a in cmake_args(epyc))
    no_vnni = xeon - {"avx512_vnni"}  # llama.cpp's AMX kernels use AVX-512 VNNI too
    assert not any("AMX" in a and a.endswith("ON") for a in cmake_args(no_vnni))
    laptop = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512_vnni"}  # a stray part without AVX-512 itself
    args = cmake_args(laptop)
    assert "-DGGML_AVX2=ON" in args and "-DGGML_AVX512=OFF" in args and "-DGGML_AVX512_VNNI=OFF" in args
    assert missing_from_build(xeon, {"AVX", "AVX2", "FMA", "F16C", "BMI2"}) == [
        "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"]
    assert missing_from_build(laptop, {"AVX", "AVX2", "FMA", "F16C", "BMI2"}) == []


# What llama.cpp's AMX kernels do (ggml-cpu/amx/mmq.cpp: ggml_tile_config_init, then tile products), in
# little: fill a 64-byte configuration field by field, load it, multiply two int8 tiles, and read the
# configuration back with sttilecfg. Compiled with gcc 12 and without the fix, the field stores are
# optimized away and tilezero traps (SIGILL).
AMX_PROGRAM = r"""
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <unistd.h>
#include <sys/syscall.h>
struct tile_config_t { uint8_t palette_id = 0; uint8_t start_row = 0; uint8_t reserved_0[14] = {0};
                       uint16_t colsb[16] = {0}; uint8_t rows[16] = {0}; };
__attribute__((noinline)) void configure() {
    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    for (int i = 0; i < 8; ++i) { tc.rows[i] = 16; tc.colsb[i] = 64; }
    _tile_loadconfig(&tc);
}
int main() {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 3;
    configure();
    alignas(64) static int8_t a[16 * 64], b[16 * 64]; alignas(64) static int32_t c[16 * 16];
    for (int i = 0; i < 16 * 64; ++i) { a[i] = 1; b[i] = 2; }
    _tile_zero(4); _tile_loadd(1, a, 64); _tile_loadd(2, b, 64); _tile_dpbssd(4, 1, 2); _tile_stored(4, c, 64);
    alignas(64) unsigned char back[64]; _tile_storeconfig(back);
    _tile_release();
    std::printf("%d %d %d %d\n", c[0], back[0], back[48], back[16]);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
def test_the_amx_fix_makes_llama_cpps_tile_configuration_reach_the_cpu(tmp_path):
    from convllava_edge.buildflags import AMX_FIX, cpu_flags

    source = tmp_path / "amx.cpp"
    source.write_text(AMX_PROGRAM)
    flags = ["-O2", "-mamx-tile", "-mamx-int8", "-std=c++17"]
    build = subprocess.run(["g++", *flags, f"-include{AMX_FIX}", str(source), "-o", str(tmp_path / "amx")],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    if "amx_int8" not in cpu_flags():
        pytest.skip("compiled; running it needs a CPU with AMX")  # the build flags never enable AMX there
    run = subprocess.run([str(tmp_path / "amx")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr}"
    # 64 products of 1*2; palette 1; rows[0] = 16; colsb[0] = 64 (low byte)
    assert run.stdout.split() == ["128", "1", "16", "64"]
