"""fp16 and int8 variants of the fp32 vision graph.

Both come from onnxruntime's own tools. optimum's ORT quantizer would be the other choice, but it
lives in optimum-onnx, which pins transformers < 4.58 and optimum ~= 2.1, while the exporter needs
transformers >= 5 (its ConvNeXt exports the channels-first LayerNorm as a real LayerNormalization);
optimum's quantizer is itself a wrapper over the onnxruntime.quantization calls made here.

- fp16: every float tensor converted, inputs/outputs kept fp32 so callers do not change. LayerNorm
  stays one LayerNormalization op with ``stash_type=1``: mean and variance in fp32 (the ONNX default;
  onnx-tensorrt maps it to the normalization layer's compute precision), so squares of large
  activations never overflow fp16.
- int8, dynamic (no calibration images): per-channel int8 weights for the MatMuls only, activations
  quantized at run time, each GELU one contrib Gelu op (fuse_gelu). Measured on this CPU: 2.65x faster than
  fp32, whereas also quantizing the depthwise/downsampling Convs this way made the graph slower than fp32
  (0.57x). CPU-oriented:
  MatMulInteger/DynamicQuantizeLinear are not TensorRT ops.
- bf16: no new file. The fp32 graph, run by OpenVINO with bf16 inference precision (bf16_backend); the
  export measures it against fp32 arithmetic like the other variants.
- int8, static (calibration images given): QDQ format, per-channel symmetric int8 weights and
  symmetric int8 activations (zero points 0, as TensorRT requires) around MatMul and Conv, except the
  stem Conv on raw pixels (see _stem_convs); this is the variant TensorRT builds as an explicitly
  quantized network.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from ..errors import ExportError, unknown_choice
from ..families.convllava import INPUT_NAME

VARIANTS = ("fp32", "fp16", "int8", "bf16")
# bf16 is no file of its own: the fp32 graph, run with bf16 arithmetic by a backend that has it.
DYNAMIC_METHOD = "dynamic int8 (MatMul weights per-channel, activations at run time)"
BF16_METHOD = "the fp32 graph run in bf16 arithmetic (OpenVINO's inference precision), measured so at export"


def bf16_backend(threads: int | None = None):
    """The backend that runs (and so validates) the bf16 vision type: OpenVINO on a CPU with bf16 arithmetic.
    Anything else is a one-line refusal naming what is missing: a cosine is only recorded when it was measured."""
    from ..backends import open_vision_backend
    from ..errors import ConfigError

    try:
        return open_vision_backend("cpu", threads, "openvino", precision="bf16")
    except ConfigError as e:
        raise ExportError(f"--vision-type bf16 is measured at export by running it, and this machine cannot: {e}") from None


# RMSNorm (Llama layers) has no op below opset 23: its square, mean and root stay fp32 in fp16 graphs,
# or squares of activations above ~256 overflow fp16.
RMSNORM_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal"]


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every subgraph that depends only on weights (e.g. a position-table lookup, a compressor's
    query side). The exporter's own pass skips inputs over 8192 elements; TensorRT wants none left."""
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model, input_size_limit=1 << 30, output_size_limit=1 << 30)


def convert_fp16(src: Path, dst: Path, keep_fp32_ops: list[str] | None = None) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))  # loads external data too
    model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                       op_block_list=keep_fp32_ops or None)
    _unique_node_names(model16.graph)
    if keep_fp32_ops:
        # The converter leaves value_info types from before its casts, and Casts of constants behind.
        del model16.graph.value_info[:]
        model16 = fold_constants(model16)
    for node in model16.graph.node:
        if node.op_type == "LayerNormalization":
            _set_int_attribute(node, "stash_type", 1)  # fp32 statistics; explicit so linters and TensorRT see it
    _sort_topologically(model16.graph)
    onnx.save_model(model16, str(dst))
    return dst


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """The converter appends its input Casts after their consumers; ONNX requires producers first."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"graph has a cycle or a dangling input at node {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def _unique_node_names(graph: onnx.GraphProto) -> None:
    """The converter puts one Cast before each blocked consumer of a shared value, all with the same
    node name and output name. Identical copies are dropped (consumers read the first's output); the
    remaining names are made unique, as ONNX requires."""
    producers: dict[str, onnx.NodeProto] = {}
    kept = []
    for node in graph.node:
        first = next((producers[o] for o in node.output if o in producers), None)
        if first is None:
            producers.update({o: node for o in node.output})
            kept.append(node)
        elif node.op_type == "Cast" and first.op_type == "Cast" and list(node.input) == list(first.input) \
                and list(node.attribute) == list(first.attribute):
            continue  # the same Cast again
        else:
            raise ExportError(f"fp16 conversion produced two different nodes writing {node.output[0]!r}")
    del graph.node[:]
    graph.node.extend(kept)
    seen: dict[str, int] = {}
    for node in graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _shape_inference_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime.quantization's ``save_and_reload_model_with_shape_infer`` for the dynamic quantizer, without its
    copies of the weights.

    The quantizer calls it after rewriting Gemm nodes, to refresh the graph's value_info: it deep-copies the model,
    saves the copy, runs shape inference on the file and loads the result, so three copies of the weights are
    resident at once (measured: 8.44 GB for the 2.8 GB graph of the 1536 px tower). Shape inference needs the
    initializers' types and shapes, not their values (only small constants, such as Reshape's shapes, are read):
    here it runs on a copy whose large initializers carry no data, and its value_info, inputs and outputs are put
    into ``model`` itself (with the data_location the round trip leaves on the tensors it moved), which is returned
    as the model the quantizer goes on with. Same result, one copy
    (tests/parity/test_vision_parity.py compares the quantized files byte for byte with onnxruntime's own path).
    """
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    skeleton = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(skeleton, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(skeleton.graph, field, value)
    for tensor in model.graph.initializer:
        if tensor.ByteSize() < _SKELETON_DATA_BYTES:
            skeleton.graph.initializer.add().CopyFrom(tensor)
        else:  # a weight: its type and shape are all shape inference reads
            stub = skeleton.graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    for tensor in model.graph.initializer:
        # what the round trip through external data leaves on the tensors it moved: data_location present, DEFAULT
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= EXTERNAL_SIZE_THRESHOLD:
            tensor.data_location = onnx.TensorProto.DEFAULT
    for name in ("input", "output", "value_info"):
        target = getattr(model.graph, name)
        del target[:]
        target.extend(getattr(inferred.graph, name))
    add_infer_metadata(model)
    return model


# onnx.save_model's size_threshold: smaller tensors stay inside the graph file (our graphs' external data, and the
# quantizer's round trip through it)
EXTERNAL_SIZE_THRESHOLD = 1024
_SKELETON_DATA_BYTES = 64 * 1024  # initializers this small keep their values in the skeleton (shape constants)


def _copy_field(target, field, value) -> None:
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def quantize_int8_dynamic(src: Path, dst: Path, lean: bool = True) -> Path:
    """MatMul-only dynamic int8 (per-channel int8 weights) by onnxruntime.quantization, its Gelu fused after. With
    ``lean`` the quantizer's shape inference runs in place (_shape_inference_in_place): the same file, one copy of
    the weights in memory instead of three."""
    import onnxruntime.quantization.onnx_quantizer as onnx_quantizer
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reload = onnx_quantizer.save_and_reload_model_with_shape_infer
    with _quiet():
        if lean:
            onnx_quantizer.save_and_reload_model_with_shape_infer = _shape_inference_in_place
        try:
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=_has_external_data(src))
        finally:
            onnx_quantizer.save_and_reload_model_with_shape_infer = reload
    fuse_gelu(dst)
    return dst


def has_fused_gelu(path: Path) -> bool:
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type == "Gelu" and n.domain == "com.microsoft" for n in graph.node)


def fuse_gelu(path: Path) -> bool:
    """Rewrite each erf GELU (Div, Erf, Add, Mul, Mul) of the graph at ``path`` as one Gelu op, in place.

    The exporter writes transformers' GELU as x * (0.5 * (1 + erf(x / sqrt 2))), an order that onnxruntime's
    own session-time GeluFusion does not match, so every block ran five elementwise passes over its widest
    activation. onnxruntime.quantization's FusionGelu matches it and writes the contrib Gelu (com.microsoft),
    which only the dynamic int8 graph gets: it is already onnxruntime's own (MatMulInteger), while the fp32
    and static QDQ graphs stay standard ONNX for TensorRT. Measured on the AMD EPYC, full tower at 768 px,
    2 threads: 2.09 s -> 1.85 s (elementwise time 0.60 s -> 0.26 s), cosine to the unfused graph 0.9997.
    """
    from onnxruntime.quantization.fusions import FusionGelu
    from onnxruntime.quantization.onnx_model import ONNXModel

    external = _has_external_data(path)
    model = ONNXModel(onnx.load(str(path), load_external_data=True))
    if not FusionGelu(model).apply():
        return False
    model.topological_sort()
    if external:
        onnx.save_model(model.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model.model, str(path))
    return True


def quantize_int8_static(src: Path, dst: Path, calibration: Iterable[np.ndarray]) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    batches = list(calibration)
    if not batches:
        raise ExportError("static int8 quantization needs at least one calibration image")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(batches)

        def get_next(self):
            pixels = next(self._it, None)
            return None if pixels is None else {INPUT_NAME: pixels}

    with _quiet():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Conv"], per_channel=True, nodes_to_exclude=_stem_convs(src),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_has_external_data(src),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                        calibration_providers=["CPUExecutionProvider"])
    return dst


def _stem_convs(path: Path) -> list[str]:
    """The Conv(s) reading the raw pixels stay fp32.

    Measured on the tiny tower (9 held-out images): quantizing everything else gives mean cosine
    0.9990; quantizing the 4x4 patch-embedding stem too drops it to 0.964 (min 0.79), for ~0.2% of
    the compute. Depthwise and downsampling Convs alone cost 0.0005 each.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv" and INPUT_NAME in n.input]


def _has_external_data(path: Path) -> bool:
    # The calibrator saves an augmented copy of the graph; over 2 GiB that copy needs external data too.
    return path.with_name(path.name + ".data").exists()


def make_variant(variant: str, fp32_path: Path, dst: Path, calibration: list[np.ndarray] | None = None) -> tuple[Path, str]:
    """Write one variant; returns (path, method) where method says how it was made."""
    if variant == "fp16":
        return convert_fp16(fp32_path, dst), "fp16 weights and activations, LayerNorm statistics in fp32"
    if variant == "int8":
        if calibration:
            return (quantize_int8_static(fp32_path, dst, calibration),
                    f"static QDQ int8 (MatMul, Conv but the stem; per-channel symmetric), calibrated on {len(calibration)} images")
        path = quantize_int8_dynamic(fp32_path, dst)
        return path, DYNAMIC_METHOD + ("; each GELU one Gelu op" if has_fused_gelu(path) else "")
    raise unknown_choice("vision variant", variant, [v for v in VARIANTS if v not in ("fp32", "bf16")])


class _quiet:
    """onnxruntime.quantization logs every skipped node at WARNING; the export reports instead."""

    def __enter__(self):
        self._logger = logging.getLogger()
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
