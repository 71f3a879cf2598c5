"""The vision backend on OpenVINO (CPU): the bundle's ONNX graphs read directly, the arithmetic explicit.

OpenVINO's CPU plugin runs fp32 models in bf16 by default where the CPU has bf16 (AVX512-BF16, AMX):
``precision`` is therefore always set, "f32" for every vision type but bf16, so fp32 means fp32 arithmetic
here as on ONNX Runtime. Needs the ``openvino`` extra (no torch).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BundleError, ConfigError, unknown_choice
from ..threads import check_threads, default_threads
from .base import DEVICES, check_graph_names, checked_outputs, first_line

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # our name -> OpenVINO's INFERENCE_PRECISION_HINT
# Every inference runs on this one thread, never on the caller's. OpenVINO's bf16 kernels load their own AMX
# tile configuration into the thread that calls them; llama.cpp's AMX kernels configure a thread's tiles once,
# the first time, and trust them after. Run on the thread that also drives llama.cpp (a chat: the LLM answers,
# the next image is encoded, the LLM answers again), OpenVINO left its configuration behind and llama.cpp's
# next AMX multiply died (SIGILL or SIGSEGV; tests/e2e/test_openvino.py reproduces it).
_OV_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openvino")


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OvGraph:
    """One graph (the Graph of backends/base.py), compiled for the input shapes it is run with: the graphs'
    H x W are dynamic, and OpenVINO's CPU plugin picks faster kernels for a static shape (the full ConvLLaVA
    tower at 768 px in bf16, 2 threads: 1.02 s static against 1.16 s dynamic; in 4 interleaved rounds on a
    busier machine 1.93 s against 2.15 s, medians). The last shape's compilation is kept.
    Graphs that take sequences (LLaVA-Mini's pre-fusion: one length per prompt) compile once, dynamic: a
    compilation per prompt would cost more than it saves."""

    def __init__(self, core, model, config: dict, path: Path):
        self.core, self.model, self.config, self.path = core, model, config, path
        self.input_names = [i.get_any_name() for i in model.inputs]
        self.output_names = [o.get_any_name() for o in model.outputs]
        self._shapes, self.request = None, None

    def _request_for(self, feeds: dict[str, np.ndarray]):
        shapes = {name: tuple(a.shape) for name, a in feeds.items()}
        if any(len(s) != 4 for s in shapes.values()):
            shapes = None  # compiled as the graph declares it
        if self.request is None or shapes != self._shapes:
            self.request = None  # the previous compilation's memory goes first
            model = self.model.clone()
            if shapes is not None:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
            self.request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            self._shapes = shapes
        return self.request

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        def infer():
            contiguous = {name: np.ascontiguousarray(a) for name, a in feeds.items()}
            # a port has every name its tensor has (an fp16 graph's output is also its Cast's input): match on any
            by_name = {name: value for port, value in self._request_for(contiguous).infer(contiguous).items()
                       for name in port.get_names()}
            return [by_name[name] for name in outputs]

        # not on the caller's thread: see _OV_THREAD
        return _OV_THREAD.submit(checked_outputs, self.path, "OpenVINO", outputs, infer).result()


class OpenVinoBackend:
    """OpenVINO on the CPU (the VisionBackend of backends/base.py)."""

    def __init__(self, device: str = "auto", threads: int | None = None, precision: str = "fp32"):
        if device not in DEVICES:
            raise unknown_choice("device", device, DEVICES)
        if device == "cuda":
            raise ConfigError("--vision-backend openvino runs on the CPU; --device cuda needs --vision-backend onnxruntime")
        if precision not in PRECISIONS:
            raise unknown_choice("OpenVINO precision", precision, PRECISIONS)
        check_threads(threads)
        try:
            import openvino
        except ImportError:
            raise ConfigError("--vision-backend openvino needs OpenVINO (pip install 'convllava-edge[openvino]')") from None
        self.core = openvino.Core()
        capabilities = self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in capabilities:
            raise ConfigError("the bf16 vision type needs a CPU with bf16 arithmetic (AVX512-BF16 or AMX); this one has "
                              f"{', '.join(capabilities)}: use the fp32 or int8 vision type")
        self.precision, self.threads = precision, threads or default_threads()
        self.config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "INFERENCE_NUM_THREADS": self.threads,
                       "PERFORMANCE_HINT": "LATENCY"}
        self.providers = [f"OpenVINO CPU ({precision})"]
        self.note = f"vision on CPU (OpenVINO {openvino.__version__.split('-')[0]}, {precision})"

    def load(self, path: str | os.PathLike, inputs: Sequence[str], outputs: Sequence[str]) -> OvGraph:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: graph not found")
        try:
            model = self.core.read_model(str(path))
        except Exception as e:
            raise BundleError(f"{path}: OpenVINO cannot load this graph: {first_line(e)}") from e
        graph = OvGraph(self.core, model, self.config, path)
        check_graph_names(graph, inputs, outputs)
        return graph
