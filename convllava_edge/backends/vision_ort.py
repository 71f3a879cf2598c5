"""The vision backend on ONNX Runtime: CPU, CUDA and TensorRT execution providers."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BundleError, ConfigError, unknown_choice
from ..threads import check_threads, default_threads
from .base import DEVICES, check_graph_names, checked_outputs

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@dataclass(frozen=True)
class ProviderChoice:
    providers: list[str]
    note: str  # one line for the user: what runs the graph and, on a fallback, why


def choose_providers(device: str, available: Sequence[str], tensorrt_libs: bool) -> ProviderChoice:
    """Pick ONNX Runtime execution providers for ``device``.

    onnxruntime-gpu lists the CUDA and TensorRT providers whether or not a GPU or the TensorRT
    libraries are present, so ``available`` alone is not proof; the session reports what it really
    got (see OrtBackend.providers). TensorRT goes first only when its libraries are installed.
    """
    if device not in DEVICES:
        raise unknown_choice("device", device, DEVICES)
    if device == "cpu":
        return ProviderChoice([CPU], "vision on CPU (ONNX Runtime)")
    if CUDA in available:
        chain = ([TENSORRT] if tensorrt_libs and TENSORRT in available else []) + [CUDA, CPU]
        return ProviderChoice(chain, f"vision on GPU ({chain[0].removesuffix('ExecutionProvider')})")
    if device == "cuda":
        raise ConfigError(
            "--device cuda: this onnxruntime has no CUDA provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (the 'gpu' extra)"
        )
    return ProviderChoice([CPU], "vision on CPU (no CUDA provider in this onnxruntime)")


def tensorrt_libraries_present() -> bool:
    """True when TensorRT's runtime can be loaded (pip 'tensorrt' wheels or a system libnvinfer)."""
    return importlib.util.find_spec("tensorrt_libs") is not None or ctypes.util.find_library("nvinfer") is not None


@dataclass
class Session:
    session: object  # onnxruntime.InferenceSession
    providers: list[str]  # what ONNX Runtime really uses, first = main
    note: str  # one line for the user: where the graph runs and, on a fallback, why
    threads: int


def open_session(path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Session:
    """An ONNX Runtime session on the best available provider for ``device``."""
    import onnxruntime as ort  # deferred: importing onnxruntime costs ~0.3 s

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: graph not found")
    check_threads(threads)
    choice = choose_providers(device, ort.get_available_providers(), tensorrt_libraries_present())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or default_threads()
    options.log_severity_level = 3  # errors only: ORT's fallback warnings go to our note instead
    provider_options = [_provider_options(p, cache_dir) for p in choice.providers]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=choice.providers,
                                       provider_options=provider_options)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types, all from RuntimeError or Exception
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph: {e}") from e
    providers = session.get_providers()
    note = choice.note
    if choice.providers[0] != CPU and providers[0] == CPU:
        note = "vision on CPU: the CUDA provider failed to start (no GPU or CUDA libraries)"
        if device == "cuda":
            raise ConfigError(f"--device cuda: {note}")
    return Session(session, providers, note, options.intra_op_num_threads)


def _provider_options(provider: str, cache_dir: str | os.PathLike | None) -> dict[str, str]:
    if provider == TENSORRT and cache_dir is not None:
        # Engines take minutes to build for the full tower: keep them between runs.
        return {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache_dir), "trt_fp16_enable": "1"}
    return {}


class OrtGraph:
    """One graph in an ONNX Runtime session (the Graph of backends/base.py)."""

    def __init__(self, session: Session, path: Path):
        self.session, self.path = session.session, path
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_session(self.session, self.path, list(outputs), feeds)


class OrtBackend:
    """ONNX Runtime on the best provider for ``device`` (the VisionBackend of backends/base.py)."""

    def __init__(self, device: str = "auto", threads: int | None = None, cache_dir: str | os.PathLike | None = None):
        if device not in DEVICES:
            raise unknown_choice("device", device, DEVICES)
        check_threads(threads)
        self.device, self.cache_dir = device, cache_dir
        self.threads = threads or default_threads()
        self.providers: list[str] = []
        self.note = ""

    def load(self, path, inputs: Sequence[str], outputs: Sequence[str]) -> OrtGraph:
        session = open_session(path, self.device, self.threads, self.cache_dir)
        graph = OrtGraph(session, Path(path))
        check_graph_names(graph, inputs, outputs)
        if not self.providers:  # the first graph's session says where this backend runs
            self.providers, self.note = session.providers, session.note
        return graph


def run_session(session, path: Path, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run``, its outputs ours and checked (backends/base.py's checked_outputs)."""
    return checked_outputs(path, "ONNX Runtime", outputs, lambda: session.run(outputs, feeds))
