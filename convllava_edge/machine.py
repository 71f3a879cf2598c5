"""What this machine and install are, as the records that depend on them are keyed: the CPU (model, flags),
llama.cpp's libraries (their SHA-256) and build features, installed versions. No side effects beyond reading."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path


def library_dir() -> Path:
    """Where llama-cpp-python loads llama.cpp from: ``$LLAMA_CPP_LIB_PATH`` (its own override) or its lib/."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def library_files() -> list[Path]:
    """llama.cpp's shared libraries (libllama, libggml*, ...), which decide what runs; each real file once
    (libfoo.so and libfoo.so.0 are links to one file)."""
    found = {p.resolve() for p in library_dir().glob("*")
             if p.is_file() and (".so" in p.name or p.suffix in (".dylib", ".dll"))}
    return sorted(found)


@functools.lru_cache(maxsize=1)
def library_digest() -> str:
    h = hashlib.sha256()
    for path in library_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """Model name and feature flags from /proc/cpuinfo (Linux); the platform's words elsewhere."""
    import platform

    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
                if key == "" and flags:  # the first processor's block is enough
                    break
    except OSError:
        pass
    return {"model": model, "flags": sorted(flags), "machine": platform.machine()}


def cpu_digest() -> str:
    info = cpu_info()
    return hashlib.sha256(json.dumps([info["model"], info["flags"], info["machine"]]).encode()).hexdigest()


def installed_version(name: str) -> str | None:
    """An installed distribution's version (records are keyed by them; ``doctor`` lists them)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def build_features() -> frozenset[str]:
    """The instruction sets llama.cpp's CPU backend was built with ("AVX512", "AMX_INT8", ...), from
    its own ``llama_print_system_info`` ("AVX512 = 1 | ...")."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return frozenset(part.split("=")[0].split(":")[-1].strip() for part in info.split("|") if part.strip().endswith("= 1"))
