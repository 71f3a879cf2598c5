"""What every family's ONNX export shares: a quiet exporter, the opset check, saving (external data when
large), the files a graph is made of, and the fp32 tolerance against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ..errors import ExportError
from ..quantize.onnx_variants import EXTERNAL_SIZE_THRESHOLD as SIZE_THRESHOLD  # one figure: the quantizer's round trip

# Graphs whose weights exceed this go to ONNX external data: protobuf cannot serialise a message
# over 2 GiB, and the 1536 tower alone holds ~669M fp32 parameters (2.7 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# fp32 ONNX Runtime vs fp32 PyTorch: only summation order differs; 1e-4 of the output's scale leaves
# room for deep towers' accumulated rounding while still catching any wrong op (those give ~1e-1).
FP32_TOLERANCE = 1e-4


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx prints progress lines and warns about opset conversion; the export reports instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_opset(proto: onnx.ModelProto, expected: int, what: str) -> None:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != expected:
        raise ExportError(f"{what}: exporter produced opset {opset}, expected {expected}")


def needs_external_data(module: torch.nn.Module) -> bool:
    """Whether the module's weights exceed what one protobuf message holds (they go to ``path.data``)."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD


def stream_weights(model, data_path: Path) -> bool:
    """Write the large initializers of ``model`` (torch.onnx's onnx_ir Model) to ``data_path`` one tensor at a time
    and leave the model pointing at them, so that serializing it afterwards copies no weights.

    ``ONNXProgram.model_proto`` serializes every weight into one protobuf message: at 1536 px a second 2.8 GB copy of
    the tower beside the module's own. Written by hand because neither onnx nor onnx_ir writes external data from an
    IR model without that message; the bytes are onnx.save_model's with ``save_as_external_data`` (each tensor whose
    raw bytes pass its size threshold appended in initializer order, no alignment, then location/offset/length
    entries), which tests/parity/test_vision_parity.py compares file by file. Returns False, writing nothing, for a
    graph with subgraphs (onnx walks their initializers in its own order): the caller serializes it whole.
    """
    import sys

    import onnx_ir as ir
    from onnx_ir.serde import TensorProtoTensor

    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in model.graph.all_nodes() for attr in node.attributes.values()):
        return False
    data_path.parent.mkdir(parents=True, exist_ok=True)
    with open(data_path, "xb") as data:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, (ir.ExternalTensor, ir.StringTensor)):
                continue
            if isinstance(tensor, TensorProtoTensor):  # kept as the exporter's proto: external only if raw bytes
                if not tensor.raw.HasField("raw_data"):
                    continue
                raw = tensor.raw.raw_data
            else:
                raw = tensor.tobytes()
            if sys.getsizeof(raw) < SIZE_THRESHOLD:  # onnx's own test of the threshold
                continue
            offset = data.tell()
            data.write(raw)
            value.const_value = ir.ExternalTensor(data_path.name, offset, len(raw), tensor.dtype, shape=tensor.shape,
                                                  name=value.name, doc_string=tensor.doc_string,
                                                  base_dir=data_path.parent)
            del raw
    return True


def save_graph(proto: onnx.ModelProto, path: Path, module: torch.nn.Module) -> Path:
    """Write ``path``, with the weights in ``path.data`` when the module's exceed what protobuf holds (already
    there, and ``proto`` pointing at them, when stream_weights wrote them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if needs_external_data(module):
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=SIZE_THRESHOLD)
    else:
        onnx.save_model(proto, str(path))
    return path


def graph_files(path: Path) -> list[Path]:
    """The graph file and its external-data file, when it has one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]
