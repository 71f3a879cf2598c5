"""The llama.cpp build for this CPU's vector units: CMAKE_ARGS for llama-cpp-python.

This names the instruction sets one by one from the CPU's own flags (AVX-512, VNNI, BF16, AMX where
present) rather than ``-march=native`` (pip's default), so the build says what it uses and runs on
this CPU and on any with the same or more.

AMX: pip's default build traps on Xeons with gcc 12 ("Illegal instruction" at the first AMX tile
instruction). The cause, found here: gcc 12's ``_tile_loadconfig`` tells the optimizer it reads 8 bytes
of the 64-byte tile configuration, so the stores filling the rest are dropped and the tiles stay
unconfigured. ``native_build/gcc_amx_fix.h``, force-included into the C++ sources, gives the
instruction its whole operand; with it llama.cpp's AMX kernels run (and native.py's probe still
checks every build before a model loads with them). ``--no-amx`` leaves AMX out.

Stands alone (no package imports) so that the Makefile can run it before anything is installed:
``python3 convllava_edge/buildflags.py [--no-amx]``.
"""

from __future__ import annotations

import os
import sys

# GGML cmake option -> the /proc/cpuinfo flags its compiler switches need (ggml/src/ggml-cpu/CMakeLists.txt:
# GGML_AVX512 adds -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw).
GGML_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
    "GGML_AMX_TILE": ("amx_tile",),
    "GGML_AMX_INT8": ("amx_tile", "amx_int8"),
    "GGML_AMX_BF16": ("amx_tile", "amx_bf16"),
}
AMX_FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_build", "gcc_amx_fix.h")
ALWAYS = ("-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF")  # no mtmd: ConvNeXt is not a CLIP it knows


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cmake_args(flags: set[str], amx: bool = True) -> list[str]:
    """CMAKE_ARGS for these CPU flags; AVX-512's parts only with AVX-512 itself (ggml's rule), AMX only
    with AVX-512 VNNI (llama.cpp's AMX kernels need both) and with the tile-configuration fix."""
    avx512 = all(f in flags for f in GGML_OPTIONS["GGML_AVX512"])
    # the fix header travels as a path in CMAKE_ARGS, which pip's build splits at spaces
    amx = amx and avx512 and "avx512_vnni" in flags and " " not in AMX_FIX and os.path.isfile(AMX_FIX)
    args = list(ALWAYS)
    for option, needs in GGML_OPTIONS.items():
        on = all(f in flags for f in needs)
        if option.startswith("GGML_AVX512_") and not avx512:
            on = False
        if option.startswith("GGML_AMX_") and not amx:
            on = False
        args.append(f"-D{option}={'ON' if on else 'OFF'}")
    if amx and "amx_int8" in flags:
        args.append(f"-DCMAKE_CXX_FLAGS=-include{AMX_FIX}")
    return args


def missing_from_build(flags: set[str], built: set[str]) -> list[str]:
    """Instruction sets this CPU has that llama.cpp's build does not use (names as llama_print_system_info
    spells them: AVX512, AVX512_VNNI, ...)."""
    usable = {a[2:].split("=")[0] for a in cmake_args(flags) if a.endswith("=ON")}
    return [option.removeprefix("GGML_") for option in GGML_OPTIONS
            if option in usable and option not in ("GGML_SSE42", "GGML_AMX_TILE", "GGML_AMX_BF16")
            and option.removeprefix("GGML_") not in built]  # llama.cpp reports AMX_INT8 only


if __name__ == "__main__":
    argv = sys.argv[1:]
    print(" ".join(cmake_args(cpu_flags(*[a for a in argv if not a.startswith("--")][:1]), amx="--no-amx" not in argv)))
