"""PyTorch vision module -> one ONNX graph, validated against PyTorch right after it is written.

The graph: ``pixel_values [1, 3, 64*grid_height, 64*grid_width]`` -> ``image_embeds [1,
grid_height*grid_width, n_embd]`` (what the LLM receives) and ``image_features`` (the tower's tokens
before the projector, for accuracy checks; runtimes that do not ask for it do not pay for it). H
and W are dynamic but must be multiples of the tower's total stride, which torch.export states as
derived dimensions, so the constraint is in the graph itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch.export import Dim

from ...errors import ExportError
from ...families.convllava import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME, ConvLlavaEncoder
from ...metrics import relative_max_error
from ..onnx_graphs import FP32_TOLERANCE, check_opset, needs_external_data, quiet_exporter, save_graph, stream_weights
from .vision_model import ConvLlavaVision, VisionGraph

# LayerNormalization entered ONNX at opset 17, and TensorRT 8.6 (JetPack 5) reads up to 17; TensorRT
# 10 reads 9-20. torch's exporter emits 18 and converts down; none of our ops changed between the two.
OPSET = 17
MAX_GRID = 256  # largest H/64 or W/64 the graph accepts: 16384 px, far beyond any preprocessing mode


@dataclass(frozen=True)
class ValidationResult:
    """One exported graph compared with PyTorch at one input shape."""

    height: int
    width: int
    rel_error: float  # max |onnx - torch| / max |torch|
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tolerance


def export_onnx(model: ConvLlavaVision, path: Path, sample_hw: tuple[int, int], stride: int) -> Path:
    """Trace ``model`` with dynamic H/W and write ``path`` (+ ``path.data`` when large)."""
    graph_module = VisionGraph(model.eval())
    gh, gw = Dim("grid_height", min=1, max=MAX_GRID), Dim("grid_width", min=1, max=MAX_GRID)
    sample = torch.zeros(1, 3, *sample_hw)
    with quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                graph_module, (sample,), None, input_names=[INPUT_NAME], output_names=[FEATURES_NAME, OUTPUT_NAME],
                opset_version=OPSET, dynamo=True, dynamic_shapes={"pixel_values": {2: stride * gh, 3: stride * gw}},
                verbose=False,
            )
        except Exception as e:  # torch.export raises many types; all mean "this module did not trace"
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if needs_external_data(model):  # the weights go to the data file one by one: no second copy of the tower
        stream_weights(program.model, path.with_name(path.name + ".data"))
    model_proto = program.model_proto
    del program
    check_opset(model_proto, OPSET, path.name)
    _name_output_dims(model_proto)
    return save_graph(model_proto, path, model)


def _name_output_dims(model: onnx.ModelProto) -> None:
    """Give the token axis a readable name instead of the exporter's symbol (e.g. 's87*s93')."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) == 3 and not dims[1].dim_value:
            dims[1].dim_param = "grid_height*grid_width"


def torch_outputs(model: ConvLlavaVision, inputs: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The module's (features, embeds) for each input: what the graph is validated against. Taken before the
    graph's session opens, so that the module and the session are never resident together (at 1536 px each
    holds gigabytes: the weights and the activations)."""
    with torch.no_grad():
        return [tuple(t.numpy()[0].copy() for t in model.features_and_embeds(torch.from_numpy(pixels)))
                for pixels in inputs]


def validate_onnx(path: Path, expected: Sequence[tuple[np.ndarray, np.ndarray]], inputs: Sequence[np.ndarray],
                  tolerance: float = FP32_TOLERANCE, threads: int | None = None) -> list[ValidationResult]:
    """Run the graph on each input and compare with ``expected`` (torch_outputs); raise ExportError listing every
    failure. Both outputs are compared; the result records the worse of the two.
    """
    encoder = ConvLlavaEncoder.from_file(path, "cpu", threads)
    results = []
    for pixels, want in zip(inputs, expected, strict=True):
        got = encoder.encode_both(pixels)
        for name, g, e in zip((FEATURES_NAME, OUTPUT_NAME), got, want):
            if g.shape != e.shape:
                raise ExportError(f"{path.name}: {name} shape {list(g.shape)} for input {list(pixels.shape)}, "
                                  f"PyTorch gives {list(e.shape)}")
        error = max(relative_max_error(g, e) for g, e in zip(got, want))
        results.append(ValidationResult(pixels.shape[2], pixels.shape[3], error, tolerance))
    del encoder
    failures = [r for r in results if not r.passed]
    if failures:
        detail = "; ".join(f"{r.height}x{r.width}: max error {r.rel_error:.2e} of the output's scale" for r in failures)
        raise ExportError(f"{path.name} does not match PyTorch (tolerance {tolerance:.0e}): {detail}")
    return results
