"""What this machine and this install can run: ``convllava-edge doctor``.

Every figure is read, not assumed: the CPU's flags from the kernel, llama.cpp's build from its own
``llama_print_system_info`` and the probe's verdict (native.py), ONNX Runtime's providers from
ONNX Runtime, a GPU from ``nvidia-smi`` when there is one.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from .machine import installed_version

# The flags that decide which kernels the libraries pick (x86); others are listed in full by --json.
NOTABLE_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
PACKAGES = ("convllava-edge", "numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "openvino", "llama_cpp_python", "gguf",
            "jinja2", "typer", "torch", "transformers", "onnx")




def cpu_section() -> dict[str, Any]:
    from .machine import cpu_info
    from .threads import default_threads

    info = cpu_info()
    flags = set(info["flags"])
    return {"model": info["model"], "machine": info["machine"], "cores": default_threads(),
            "features": {f: f in flags for f in NOTABLE_FLAGS}, "flags": info["flags"]}


def llama_section(run_probe: bool = True) -> dict[str, Any]:
    from . import machine, native

    out: dict[str, Any] = {"version": installed_version("llama_cpp_python")}
    try:
        import llama_cpp

        out["system_info"] = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
        out["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        out["libraries"] = [p.name for p in machine.library_files()]
        out["library_sha256"] = machine.library_digest()
    except Exception as e:  # a broken install is exactly what doctor is for: report it, do not die
        out["error"] = f"{type(e).__name__}: {e}"
        out["ok"] = False
        return out
    # llama.cpp's CPU backend lists the features it was built for, e.g. "AVX512 = 1 | AMX_INT8 = 1"
    out["build_features"] = sorted(machine.build_features())
    # the load settings chosen from the benchmarks for this build (native.load_plan)
    out["extra_buffer_types_off_for"] = sorted(t for t, f in native.EXTRA_BUFTS_OFF.items() if f in machine.build_features())
    from .buildflags import cmake_args, cpu_flags, missing_from_build

    flags = cpu_flags()
    out["unused_cpu_features"] = missing_from_build(flags, set(out["build_features"]))
    out["fast_build_cmake_args"] = " ".join(cmake_args(flags))  # this CPU's vector units, AMX with the gcc 12 fix
    verdict = native.cpu_paths_verdict(run=run_probe)
    out["probe"] = None if verdict is None else {
        "extra_buffer_types": verdict.extra_bufts, "reason": verdict.reason, "signal": verdict.signal,
        "cached": verdict.cached, "seconds": round(verdict.seconds, 3)}
    # ok: models load and run here (with or without the extra buffer types): the probe child finished
    # or died from a signal that the fallback avoids
    out["ok"] = verdict is not None and (verdict.extra_bufts or verdict.signal is not None)
    return out


def onnxruntime_section() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"ok": False, "error": str(e)}
    providers = ort.get_available_providers()
    return {"version": ort.__version__, "device": ort.get_device(), "providers": providers,
            "ok": "CPUExecutionProvider" in providers}


def gpu_section() -> dict[str, Any]:
    from .backends.vision_ort import tensorrt_libraries_present

    out: dict[str, Any] = {"nvidia_smi": shutil.which("nvidia-smi") is not None, "devices": [],
                           "tensorrt_libraries": tensorrt_libraries_present()}
    if out["nvidia_smi"]:
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            out["devices"] = [line.strip() for line in listing.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def vision_section() -> dict[str, Any]:
    """The vision backends installed, what each runs here, and what ``--vision-backend auto`` chose per bundle."""
    from .backends.vision_openvino import openvino_available
    from .records import read_record, state_dir
    from .backends import cpu_has_bf16
    from .vision import default_backend

    out: dict[str, Any] = {"default": default_backend(), "onnxruntime": {"precisions": ["fp32"]},
                           "openvino": {"installed": openvino_available(), "version": installed_version("openvino")}}
    if openvino_available():
        out["openvino"]["precisions"] = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    choices = []
    for path in sorted(state_dir().glob("vision-choice-*.json")):
        record = read_record(path.name)
        if record is not None:
            choices.append({k: record.get(k) for k in ("bundle", "vision_type", "vision_backend", "how", "date",
                                                      "calibration_s")})
    out["auto_choices"] = choices
    return out


def cache_section() -> dict[str, Any]:
    from .cache import DiskCache

    cache = DiskCache()
    folder = cache.folder
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
    return {"folder": str(folder), "exists": folder.is_dir(), "writable": os.access(probe, os.W_OK),
            "entries": cache.entries(), "size_bytes": cache.size_bytes(), "max_bytes": cache.max_bytes}


def report(run_probe: bool = True) -> dict[str, Any]:
    """Everything ``doctor`` shows; ``ok`` is true when a bundle can run here on the CPU."""
    out = {
        "cpu": cpu_section(),
        "llama_cpp": llama_section(run_probe),
        "onnxruntime": onnxruntime_section(),
        "gpu": gpu_section(),
        "vision": vision_section(),
        "cache": cache_section(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: installed_version(name) for name in PACKAGES},
    }
    out["ok"] = bool(out["llama_cpp"].get("ok") and out["onnxruntime"].get("ok"))
    return out
