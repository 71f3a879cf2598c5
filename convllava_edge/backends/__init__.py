"""Backends, chosen in one place: the vision backend that runs a bundle's graphs, the LLM backend.

``open_vision_backend`` and ``open_llm`` are what ``ask``, ``encode``, ``check`` and ``bench`` call;
a new runtime (OpenVINO, a Triton server, vLLM) is one more entry here and one more module beside.
"""

from __future__ import annotations

import os

from ..errors import ConfigError, unknown_choice
from .base import DEVICES, LlmBackend, LlmCapabilities, SamplingOptions, Step, VisionBackend

VISION_BACKENDS = ("onnxruntime", "openvino")
LLM_BACKENDS = ("llama.cpp", "vllm")


def open_vision_backend(device: str = "auto", threads: int | None = None, kind: str = "onnxruntime",
                        cache_dir: str | os.PathLike | None = None, precision: str = "fp32") -> VisionBackend:
    """``precision``: the arithmetic the graphs run in, "fp32" or "bf16" (a bundle's bf16 vision type).
    fp32 means fp32 on every backend; bf16 where the backend has it, else a one-line refusal."""
    if kind not in VISION_BACKENDS:
        raise unknown_choice("vision backend", kind, VISION_BACKENDS)
    if kind == "openvino":
        from .vision_openvino import OpenVinoBackend

        return OpenVinoBackend(device, threads, precision)
    if precision != "fp32":
        raise ConfigError(f"ONNX Runtime has no {precision} CPU kernels for these graphs: use --vision-backend openvino "
                          f"or another vision type")
    from .vision_ort import OrtBackend

    return OrtBackend(device, threads, cache_dir)


def open_llm(path: str | os.PathLike, device: str = "auto", kind: str = "llama.cpp", **options) -> LlmBackend:
    """The LLM of a bundle; ``options`` are the backend's own (llama.cpp: see LlamaCppBackend)."""
    if device not in DEVICES:
        raise unknown_choice("device", device, DEVICES)
    if kind not in LLM_BACKENDS:
        raise unknown_choice("LLM backend", kind, LLM_BACKENDS)
    if kind == "vllm":
        raise ConfigError("the vllm LLM backend runs a bundle's llm-hf/ on a vLLM server, not a GGUF file: "
                          "open_vllm(bundle, manifest, url), or --llm-backend vllm --llm-url URL")
    from .llm_llamacpp import LlamaCppBackend, gpu_layers

    return LlamaCppBackend(path, n_gpu_layers=gpu_layers(device), **options)


def open_vllm(bundle, manifest, url: str | None, model: str | None = None) -> LlmBackend:
    """A running vLLM server as the bundle's LLM (its llm-hf/ weights, prompt embeddings: llm_vllm.py)."""
    if not url:
        raise ConfigError("--llm-backend vllm needs --llm-url URL: the vLLM server (README: \"The vLLM backend\")")
    from .llm_vllm import VllmBackend

    return VllmBackend(bundle, manifest, url, model)


__all__ = ["DEVICES", "LlmBackend", "LlmCapabilities", "SamplingOptions", "Step", "VisionBackend",
           "open_llm", "open_vision_backend", "open_vllm"]
