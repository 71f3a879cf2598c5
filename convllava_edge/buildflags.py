"""The llama.cpp build for this CPU's vector units, without its AMX kernels: CMAKE_ARGS for llama-cpp-python.

pip's default build is ``-march=native``: every instruction set the CPU reports, AMX included, and
llama.cpp's AMX path traps on some Xeons (see native.py). ``GGML_AMX_*=OFF`` does not help there
(with GGML_NATIVE the compiler enables AMX all the same), so this names the instruction sets one by
one from the CPU's own flags: AVX-512, VNNI, BF16 where present, AMX never. The result runs on this
CPU and on any with the same or more. Stands alone (no package imports) so that the Makefile can run
it before anything is installed: ``python3 convllava_edge/buildflags.py``.
"""

from __future__ import annotations

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
}
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


def cmake_args(flags: set[str]) -> list[str]:
    """CMAKE_ARGS for these CPU flags; AVX-512's parts only with AVX-512 itself (ggml's rule)."""
    args = list(ALWAYS)
    for option, needs in GGML_OPTIONS.items():
        on = all(f in flags for f in needs)
        if option.startswith("GGML_AVX512_") and not all(f in flags for f in GGML_OPTIONS["GGML_AVX512"]):
            on = False
        args.append(f"-D{option}={'ON' if on else 'OFF'}")
    return args


def missing_from_build(flags: set[str], built: set[str]) -> list[str]:
    """Instruction sets this CPU has that llama.cpp's build does not use (names as llama_print_system_info
    spells them: AVX512, AVX512_VNNI, ...)."""
    usable = {a[2:].split("=")[0] for a in cmake_args(flags) if a.endswith("=ON")}
    return [option.removeprefix("GGML_") for option in GGML_OPTIONS
            if option in usable and option != "GGML_SSE42" and option.removeprefix("GGML_") not in built]


if __name__ == "__main__":
    print(" ".join(cmake_args(cpu_flags(*sys.argv[1:2]))))
