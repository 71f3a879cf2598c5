"""Backends, chosen in one place: the vision backend that runs a bundle's graphs, the LLM backend.

``open_vision_backend`` and ``open_llm`` are what ``ask``, ``encode``, ``check`` and ``bench`` call;
a new runtime (OpenVINO, a Triton server, vLLM) is one more entry here and one more module beside.
"""

from __future__ import annotations

import os

from ..errors import unknown_choice
from .base import DEVICES, LlmBackend, LlmCapabilities, SamplingOptions, Step, VisionBackend

VISION_BACKENDS = ("onnxruntime",)
LLM_BACKENDS = ("llama.cpp",)


def open_vision_backend(device: str = "auto", threads: int | None = None, kind: str = "onnxruntime",
                        cache_dir: str | os.PathLike | None = None) -> VisionBackend:
    if kind not in VISION_BACKENDS:
        raise unknown_choice("vision backend", kind, VISION_BACKENDS)
    from .vision_ort import OrtBackend

    return OrtBackend(device, threads, cache_dir)


def open_llm(path: str | os.PathLike, device: str = "auto", kind: str = "llama.cpp", **options) -> LlmBackend:
    """The LLM of a bundle; ``options`` are the backend's own (llama.cpp: see LlamaCppBackend)."""
    if device not in DEVICES:
        raise unknown_choice("device", device, DEVICES)
    if kind not in LLM_BACKENDS:
        raise unknown_choice("LLM backend", kind, LLM_BACKENDS)
    from .llm_llamacpp import LlamaCppBackend, gpu_layers

    return LlamaCppBackend(path, n_gpu_layers=gpu_layers(device), **options)


__all__ = ["DEVICES", "LlmBackend", "LlmCapabilities", "SamplingOptions", "Step", "VisionBackend",
           "open_llm", "open_vision_backend"]
