"""The export's stages never hold two models at once (issue 40), on a checkpoint whose models are large beside the
process's own memory (memwatch.write_sized_checkpoint: a 144 MB fp32 tower, a 187 MB bf16 LLM).

The export runs as `convllava-edge export` runs it, in a child of its own whose process tree is sampled every 0.1 s
(tests/support/memwatch.py: RssAnon, what a machine without swap must hold; mapped files are page cache and are
not counted). Each stage's peak is compared with a ceiling scaled to the model it handles; each ceiling is below
what one more copy of that model would take, so a stage holding one fails. The 7B-shaped figures (the floor of
<= 6 GB anonymous) are benchmarks/memory_bench.py's --export-only, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support.memwatch import export_command, memory_cgroup, run_watched, write_sized_checkpoint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)
CONVERT = "converting the LLM to GGUF"
QUANTIZE = "quantizing the LLM"
AGREEMENT = "measuring Q4_K_M against the unquantized LLM"
VISION = ("loading the vision tower", "exporting the fp32 graph", "validating the fp32 graph", "making the int8 graph")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    sized = write_sized_checkpoint(root / "ckpt")
    log = root / "stages.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = run_watched(export_command(sized.folder, root / "bundle", log, vision_types=("int8",), threads=2),
                      stage_log=log, env=env, cwd=ROOT, timeout=800)
    assert run.returncode == 0, run.stderr[-3000:]
    return sized, run, root / "bundle"


def stage(run, prefix: str) -> dict:
    found = [s for s in run.stages if s["stage"].startswith(prefix)]
    assert found, f"no stage {prefix!r} in {[s['stage'] for s in run.stages]}"
    return found[0]


def test_the_export_made_a_bundle_with_every_stage(measured):
    sized, run, bundle = measured
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["accuracy"]["llm_vs_unquantized"]["n_positions"] > 0
    for prefix in VISION + (CONVERT, QUANTIZE, AGREEMENT):
        stage(run, prefix)


def test_the_llm_stages_start_without_the_vision_sides_memory(measured):
    """The vision export runs in a process of its own (export/isolated.py): when the LLM conversion starts, the
    export holds what it held before the tower was loaded, not the tower, torch.onnx's program or ONNX Runtime's
    arenas (before: +0.36 GB here, 2.5x the tower)."""
    sized, run, _ = measured
    base = stage(run, "starting")["peak_anon"]  # the export's process, its imports done, before any model
    start = stage(run, CONVERT)["start_anon"]
    assert start - base <= 0.25 * sized.tower_fp32_bytes, (
        f"the LLM conversion starts {(start - base) / 1e6:.0f} MB above the export's base: the vision side's memory "
        f"(tower {sized.tower_fp32_bytes / 1e6:.0f} MB) is still held")


def test_converting_and_quantizing_never_hold_the_whole_llm(measured):
    """Tensors are converted and written one at a time, and llama.cpp's quantizer reads the GGUF it quantizes
    through a mapping: neither stage's anonymous memory grows by half the LLM's size."""
    sized, run, _ = measured
    start = stage(run, CONVERT)["start_anon"]
    for prefix in (CONVERT, QUANTIZE):
        grew = stage(run, prefix)["peak_anon"] - start
        assert grew <= 0.5 * sized.llm_bytes, (
            f"{prefix}: +{grew / 1e6:.0f} MB anonymous, the LLM is {sized.llm_bytes / 1e6:.0f} MB")


def test_the_agreement_holds_one_model_and_its_cache(measured):
    """The unquantized reference is mapped (file pages, not anonymous) and closed before the quantized model opens:
    the step's anonymous growth is the KV cache and the quantized model's repacked weights, below one more copy of
    the reference."""
    sized, run, _ = measured
    step = stage(run, AGREEMENT)
    grew = step["peak_anon"] - stage(run, CONVERT)["start_anon"]
    ceiling = sized.kv_bytes + 0.75 * sized.llm_bytes
    assert grew <= ceiling, (f"agreement: +{grew / 1e6:.0f} MB anonymous, ceiling {ceiling / 1e6:.0f} MB "
                             f"(KV {sized.kv_bytes / 1e6:.0f} MB, LLM {sized.llm_bytes / 1e6:.0f} MB)")


def test_the_export_completes_inside_a_memory_limit_scaled_to_the_checkpoint(tmp_path):
    """The whole export, children included, in a memory cgroup (page cache counts and is reclaimed at the limit) of
    2.5 GB: 1.5x the sampled anonymous peak of the run above (~1.7 GB here). The 7B-shaped run under a limit is
    memory_bench.py's --memory-limit."""
    limit = int(2.5e9)
    with memory_cgroup(limit) as group:
        if group is None:
            pytest.skip("this machine does not let the test make a memory cgroup (needs cgroup v1's memory controller "
                        "or a delegated v2 subtree)")
        sized = write_sized_checkpoint(tmp_path / "ckpt")
        log = tmp_path / "stages.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        run = run_watched(export_command(sized.folder, tmp_path / "bundle", log, vision_types=("int8",), threads=2),
                          stage_log=log, env=env, cwd=ROOT, timeout=800, cgroup=group)
    assert run.oom_kills == 0 and run.returncode == 0, f"exit {run.returncode}, OOM kills {run.oom_kills}: " \
                                                       f"{run.stderr[-2000:]}"
    assert run.cgroup_peak is None or run.cgroup_peak <= limit
    assert (tmp_path / "bundle" / "manifest.json").exists()


@pytest.mark.parametrize("family", ["convllava", "llava-mini"])
def test_an_isolated_export_runs_from_a_script_without_a_main_guard(family, tiny, mini, tmp_path):
    """A library user's script calling export_bundle at module level (no ``if __name__ == "__main__"``): the vision
    export's process must not run the script again (multiprocessing's spawn re-imports ``__main__``). Every stage is
    isolated here (ISOLATE_BYTES 0), as for a large checkpoint, for both built-in families."""
    import subprocess
    import sys

    sft, tower = (tiny.bin_ckpt, None) if family == "convllava" else mini
    script = tmp_path / "export_it.py"
    script.write_text(
        "from pathlib import Path\n"
        "import convllava_edge.export.isolated as isolated\n"
        "from convllava_edge.export.bundle import ExportOptions, export_bundle\n"
        "isolated.ISOLATE_BYTES = 0\n"
        f"export_bundle({str(sft)!r}, Path({str(tmp_path / 'bundle')!r}), ExportOptions(vision_types=('int8',), "
        f"llm_type='Q8_0'), vision_tower={str(tower) if tower else None!r})\n"
        "print('exported')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.count("exported") == 1, done.stderr[-3000:]
    assert (tmp_path / "bundle" / "manifest.json").exists()
