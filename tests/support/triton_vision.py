"""A real Triton server for a bundle's vision graphs, as the tests need one on a CPU-only machine: PyTriton's
own tritonserver (it has the Python backend only, no ONNX Runtime backend), one Python-backend model per graph
of a `deploy triton` repository, each running the repository's model.onnx with ONNX Runtime. Run by
.venv-triton's Python (`make triton-env`; PyTriton pins numpy<2), not imported by the tests:

    .venv-triton/bin/python tests/support/triton_vision.py REPO --http-port P --grpc-port G --metrics-port M

Inputs and outputs, their dtypes and dims are the ones config.pbtxt declares (read with tritonclient's
ModelConfig, as Triton reads them); loopback only; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.grpc import model_config_pb2

DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


def graph_model(folder: Path):
    """(config, infer function) for one model folder: its config.pbtxt and 1/model.onnx on ONNX Runtime."""
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in config.output]

    def infer(requests):
        return [dict(zip(outputs, session.run(outputs, {name: np.asarray(value) for name, value in r.items()})))
                for r in requests]
    return config, infer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo", type=Path)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    triton_config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                                 grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=0)
    with Triton(config=triton_config) as triton:
        for folder in sorted(p for p in args.repo.iterdir() if (p / "config.pbtxt").is_file()):
            config, infer = graph_model(folder)
            triton.bind(model_name=config.name, infer_func=infer,
                        inputs=[Tensor(name=i.name, dtype=DTYPES[model_config_pb2.DataType.Name(i.data_type)],
                                       shape=tuple(i.dims)) for i in config.input],
                        outputs=[Tensor(name=o.name, dtype=DTYPES[model_config_pb2.DataType.Name(o.data_type)],
                                        shape=tuple(o.dims)) for o in config.output],
                        config=ModelConfig(batching=False))
        triton.serve()


if __name__ == "__main__":
    main()
