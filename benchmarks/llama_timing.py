"""Prompt processing and decode speed of one GGUF in llama.cpp, as the benchmarks measure it (no torch here:
benchmarks/llm_build_bench.py runs it in children that must load nothing but llama.cpp)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from convllava_edge.backends.base import SamplingOptions
from convllava_edge.backends.llm_llamacpp import LlamaCppBackend, Sampler


def llama_cpp_speed(path: Path, prompt: list[int], n_decode: int, threads: int, runs: int, **load) -> dict:
    """Median tok/s of ``runs`` runs after a warm-up; ``load``: LlamaCppBackend's keyword arguments."""
    backend = LlamaCppBackend(path, n_ctx=len(prompt) + n_decode + 8, threads=threads, **load)
    sampler = Sampler(backend, SamplingOptions(temperature=0.0))
    prefill, decode = [], []
    for _ in range(runs + 1):  # the first run warms up
        backend.truncate(0)
        t = time.perf_counter()
        backend.eval_tokens(prompt)
        t1 = time.perf_counter()
        for _ in range(n_decode):
            backend.eval_tokens([sampler.sample()])
        t2 = time.perf_counter()
        prefill.append(len(prompt) / (t1 - t))
        decode.append(n_decode / (t2 - t1))
    settings = dict(backend.settings)
    backend.close()
    return {"prefill_tok_s": statistics.median(prefill[1:]), "decode_tok_s": statistics.median(decode[1:]),
            "settings": settings}
