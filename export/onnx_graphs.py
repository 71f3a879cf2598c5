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


def save_graph(proto: onnx.ModelProto, path: Path, module: torch.nn.Module) -> Path:
    """Write ``path``, with the weights in ``path.data`` when the module's exceed what protobuf holds."""
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    if n_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return path


def graph_files(path: Path) -> list[Path]:
    """The graph file and its external-data file, when it has one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]
