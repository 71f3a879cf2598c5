"""Will TensorRT build this graph well? Checked without TensorRT installed.

Checks: the full ONNX checker, strict shape inference, the opset against TensorRT's range, every op
against TensorRT's ONNX parser, LayerNorm as real LayerNormalization ops (not a ReduceMean/Pow/Sqrt
chain, which TensorRT does not fuse: fp16 overflow and slow kernels), fp32 LayerNorm statistics in
fp16 graphs, folded constants, and zero points of 0 on Q/DQ nodes (TensorRT's requirement).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BundleError

# TensorRT 10.0's ONNX parser: operators marked supported in onnx/onnx-tensorrt docs/operators.md
# (commit 96e7811, June 2024), which also gives the opset range it reads (9 to 20).
TENSORRT_OPSETS = range(9, 21)
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Ops whose inputs are all constants on purpose: weight dequantization is how explicit
# quantization is expressed to TensorRT.
_CONSTANT_INPUTS_OK = frozenset({"DequantizeLinear"})


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class LintReport:
    path: Path
    opset: int
    op_counts: dict[str, int]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        lines = [f"{self.path.name}: opset {self.opset}, {sum(self.op_counts.values())} nodes "
                 f"({', '.join(f'{op} {n}' for op, n in sorted(self.op_counts.items(), key=lambda x: -x[1]))})"]
        lines += [f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        lines.append(f"  => {'TensorRT-ready' if self.passed else 'NOT TensorRT-ready'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"file": self.path.name, "opset": self.opset, "passed": self.passed, "op_counts": self.op_counts,
                "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks]}


def lint(path: str | Path, layernorm: bool = True) -> LintReport:
    """``layernorm``: the graph's norms are LayerNorms (ConvNeXt, CLIP) and must be LayerNormalization
    ops; False for RMSNorm graphs (Llama layers), whose ReduceMean/Pow/Sqrt chain is the only form
    below opset 23 and which TensorRT fuses itself."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, onnx's own errors, OSError: no common base but Exception
        raise BundleError(f"{path}: not an ONNX graph ({type(e).__name__}: {str(e).strip()[:200]})") from e
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = list(model.graph.node)
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in nodes)
    report = LintReport(path, opset, dict(counts))
    add = report.checks.append

    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GiB with external data
        add(Check("onnx checker", True, "full check passed"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        add(Check("onnx checker", False, str(e).splitlines()[0]))

    add(_shape_check(path))
    add(Check("opset", opset in TENSORRT_OPSETS,
              f"{opset}; TensorRT 10 reads {TENSORRT_OPSETS.start}-{TENSORRT_OPSETS.stop - 1}"
              + ("" if opset <= 17 else ", TensorRT 8.6 only up to 17")))
    unsupported = sorted(op for op in counts if op not in TENSORRT_OPS)
    add(Check("operators", not unsupported,
              "all supported by TensorRT's ONNX parser" if not unsupported else
              f"not supported by TensorRT: {', '.join(f'{op} ({counts[op]})' for op in unsupported)}"))
    n_ln, n_reduce = counts.get("LayerNormalization", 0), counts.get("ReduceMean", 0)
    if layernorm:
        add(Check("LayerNorm", n_ln > 0 and n_reduce == 0,
                  f"{n_ln} LayerNormalization ops, {n_reduce} ReduceMean" +
                  ("" if n_reduce == 0 else ": a LayerNorm decomposed into reductions")))
    else:
        add(Check("RMSNorm", True, f"{n_reduce} ReduceMean chains (RMSNorm; an op only from opset 23)"))
    add(_stash_check(model))
    add(_folding_check(model))
    add(_zero_point_check(model, path.parent))
    return report


def _shape_check(path: Path) -> Check:
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        return Check("shape inference", False, str(e).splitlines()[0])
    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]
    ins = ", ".join(f"{i.name} {dims(i)}" for i in inferred.graph.input)
    outs = ", ".join(f"{o.name} {dims(o)}" for o in inferred.graph.output)
    dynamic = any(isinstance(d, str) and d for i in inferred.graph.input for d in dims(i))
    return Check("shape inference", True, f"{ins} -> {outs}" + (" (dynamic: build with an optimization profile)"
                                                              if dynamic else ""))


def _stash_check(model: onnx.ModelProto) -> Check:
    """In fp16 graphs LayerNorm statistics must be fp32 (stash_type 1, the ONNX default)."""
    fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    bad = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"
           and any(a.name == "stash_type" and a.i != 1 for a in n.attribute)]
    detail = f"{len(bad)} LayerNormalization ops compute statistics below fp32" if bad else \
        ("fp16 graph, statistics in fp32" if fp16 else "fp32 statistics")
    return Check("LayerNorm precision", not bad, detail)


def _folding_check(model: onnx.ModelProto) -> Check:
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    foldable = []
    for node in model.graph.node:  # nodes are topologically sorted in a valid graph
        inputs = [i for i in node.input if i]
        if node.op_type != "Constant" and inputs and all(i in constant for i in inputs):
            if node.op_type not in _CONSTANT_INPUTS_OK:
                foldable.append(node.op_type)
            constant.update(node.output)
    n_const = sum(1 for n in model.graph.node if n.op_type == "Constant")
    ok = not foldable
    detail = "no computation on constants" if ok else \
        f"{len(foldable)} nodes compute on constants only ({', '.join(sorted(set(foldable)))})"
    return Check("constants folded", ok, detail + (f"; {n_const} Constant nodes" if n_const else ""))


def _zero_point_check(model: onnx.ModelProto, base: Path) -> Check:
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return Check("Q/DQ zero points", True, "no Q/DQ nodes")
    nonzero = 0
    for node in qdq:
        if len(node.input) > 2 and node.input[2] in inits:
            value = numpy_helper.to_array(inits[node.input[2]], base_dir=str(base))
            nonzero += int(np.any(value != 0))
    return Check("Q/DQ zero points", nonzero == 0,
                 f"{len(qdq)} Q/DQ nodes, " + ("all zero points 0" if not nonzero else f"{nonzero} with non-zero points"))
