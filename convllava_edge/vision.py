"""The vision encoder: pixel_values [1, 3, H, W] -> image embeddings [n_tokens, n_embd], in ONNX Runtime.

The graph (written by convllava_edge.export) holds the ConvNeXt tower, the 5th stage and the
projector, so its output is already in the LLM's embedding space.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np

from .errors import BundleError, ConfigError, unknown_choice

Device = Literal["auto", "cpu", "cuda"]
DEVICES = ("auto", "cpu", "cuda")
INPUT_NAME = "pixel_values"  # [1, 3, H, W] float32, H and W multiples of the total stride
OUTPUT_NAME = "image_embeds"  # [1, (H/64) * (W/64), n_embd] float32, tokens in row-major order
FEATURES_NAME = "image_features"  # [1, (H/64) * (W/64), C_tower]: before the projector (for accuracy checks)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


class VisionEncoder(Protocol):
    """What the pipeline needs from a vision backend."""

    providers: list[str]

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [1, 3, H, W] -> float32 [n_tokens, n_embd]."""
        ...


@dataclass(frozen=True)
class ProviderChoice:
    providers: list[str]
    note: str  # one line for the user: what runs the graph and, on a fallback, why


def choose_providers(device: str, available: Sequence[str], tensorrt_libs: bool) -> ProviderChoice:
    """Pick ONNX Runtime execution providers for ``device``.

    onnxruntime-gpu lists the CUDA and TensorRT providers whether or not a GPU or the TensorRT
    libraries are present, so ``available`` alone is not proof; the session reports what it really
    got (see OnnxVisionEncoder.providers). TensorRT goes first only when its libraries are installed.
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


def default_threads() -> int:
    """The CPUs this process may run on (honours taskset/cgroup limits, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


MAX_THREADS_PER_CORE = 4  # past this, threads only contend: 1000 threads took 75 s for a 1 s answer


def check_threads(threads: int | None) -> None:
    """A thread count the machine can use: 1 to its cores x MAX_THREADS_PER_CORE (None: all cores)."""
    if threads is None:
        return
    limit = default_threads() * MAX_THREADS_PER_CORE
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise ConfigError(f"threads must be in 1..{limit} ({default_threads()} cores x {MAX_THREADS_PER_CORE}), got {threads}")


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


class OnnxVisionEncoder:
    """An ONNX Runtime session over a ConvLLaVA vision graph."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        opened = open_session(self.path, device, threads, cache_dir)
        self.session, self.providers, self.note, self.threads = opened.session, opened.providers, opened.note, opened.threads
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in {o.name for o in self.session.get_outputs()}:
            raise BundleError(f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run(pixel_values, [OUTPUT_NAME])[0]

    def encode_both(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tower features [n, C_tower], projected embeddings [n, n_embd]) in one run."""
        if FEATURES_NAME not in {o.name for o in self.session.get_outputs()}:
            raise BundleError(f"{self.path}: graph has no {FEATURES_NAME!r} output (exported by an older version)")
        features, embeds = self._run(pixel_values, [FEATURES_NAME, OUTPUT_NAME])
        return features, embeds

    def _run(self, pixel_values: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if pixel_values.ndim != 4 or pixel_values.shape[:2] != (1, 3):
            raise ConfigError(f"pixel_values must be [1, 3, H, W], got {list(pixel_values.shape)}")
        results = run_session(self.session, self.path, outputs,
                              {INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)})
        return [r[0] for r in results]


def run_session(session, path: Path, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` with ONNX Runtime's failures (a graph that asks for 4 TB, a kernel error) as one
    line, and outputs checked for NaN/Inf: a graph that passed its hash check can still be hostile.

    The outputs are copied into arrays of our own: ORT's arrays are views of its buffers, and one kept
    (an embedding in the cache or the pipeline's memory) keeps the whole session's memory alive after
    the session is gone. Measured on the 1536 px ConvLLaVA tower: 2.0 GB per session, until an export
    that encodes its probe images (a session each) was killed for memory at 22.5 GB; with copies, RSS
    returns to 0.2 GB after each (the copy: the embeddings' ~9 MB)."""
    try:
        results = [np.array(value, copy=True) for value in session.run(outputs, feeds)]
    except MemoryError as e:
        raise BundleError(f"{path}: out of memory running the graph") from e
    except Exception as e:  # ORT's Fail/RuntimeException/InvalidArgument share no public base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path}: ONNX Runtime failed running the graph: {first[:300]}") from e
    for name, value in zip(outputs, results):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise BundleError(f"{path}: output {name!r} holds NaN or Inf values")
    return results
