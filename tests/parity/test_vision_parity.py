"""The exported vision graphs against an independent reference.

Reference: transformers' ConvNextModel loaded by its own ``from_pretrained`` from the tower folder
(fp32), ``hidden_states[-1]`` flattened row-major as the official encoder does, then an
``nn.Sequential(Linear, GELU, Linear)`` projector filled with tensors read from the shards by the
test itself. Tolerances: fp32 graph within 1e-4 of the reference relative to the output's scale;
fp16 min per-token cosine >= 0.999; int8 mean cosine >= 0.99.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file
from transformers import ConvNextModel

from convllava_edge.export.bundle import ExportOptions, export_bundle
from convllava_edge.export.probe_images import probe_images
from convllava_edge.export.trt_lint import lint
from convllava_edge.manifest import load_manifest
from convllava_edge.metrics import per_token_cosine, relative_max_error
from convllava_edge.preprocess import preprocess
from convllava_edge.families.convllava import ConvLlavaEncoder

FP32_RELATIVE_TOLERANCE = 1e-4
SHAPES = [(256, 256), (128, 256), (320, 192), (64, 448)]  # square, wide, tall, and one never exported


class Reference(torch.nn.Module):
    def __init__(self, tower_dir, projector: dict[str, torch.Tensor]):
        super().__init__()
        self.tower = ConvNextModel.from_pretrained(str(tower_dir), dtype=torch.float32).eval()
        d_in, d_out = projector["model.mm_projector.0.weight"].shape[1], projector["model.mm_projector.0.weight"].shape[0]
        self.proj = torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out))
        self.proj.load_state_dict({k.removeprefix("model.mm_projector."): v.float() for k, v in projector.items()})

    @torch.no_grad()
    def forward(self, pixels: np.ndarray) -> np.ndarray:
        out = self.tower(torch.from_numpy(pixels), output_hidden_states=True)
        feats = out.hidden_states[-1]  # [1, C, H/64, W/64]
        feats = feats.permute(0, 2, 3, 1).reshape(1, -1, feats.shape[1])  # official: permute, then flatten rows
        return self.proj(feats)[0].numpy()


def _projector_from_shards(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        tensors.update({k: v for k, v in part.items() if k.startswith("model.mm_projector.")})
    return tensors


@pytest.fixture(scope="module")
def reference(tiny):
    return Reference(tiny.tower, _projector_from_shards(tiny.bin_ckpt))


@pytest.fixture(scope="module")
def config(tiny_bundle):
    return load_manifest(tiny_bundle).preprocess


def _graph(bundle, variant):
    return ConvLlavaEncoder.from_file(bundle / f"vision-{variant}.onnx", "cpu")


def _inputs(config):
    rng = np.random.default_rng(3)
    images = [preprocess(im, config, "pad") for im in probe_images(3, seed=11)]
    return images + [rng.normal(0, 1, (1, 3, h, w)).astype(np.float32) for h, w in SHAPES[1:]]


def test_reference_tower_depends_on_its_input(reference, config):
    a, b = (reference(preprocess(im, config, "pad")) for im in probe_images(2, seed=5))
    cos = float(per_token_cosine(a.reshape(1, -1), b.reshape(1, -1))[0])
    assert cos < 0.9, f"features of two different images have cosine {cos:.3f}: the tiny tower forgets its input"


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_graph_matches_transformers(tiny_bundle, reference, shape):
    pixels = np.random.default_rng(sum(shape)).normal(0, 1, (1, 3, *shape)).astype(np.float32)
    ref = reference(pixels)
    got = _graph(tiny_bundle, "fp32").encode(pixels)
    assert got.shape == ref.shape == ((shape[0] // 64) * (shape[1] // 64), 256)
    assert relative_max_error(got, ref) <= FP32_RELATIVE_TOLERANCE


def test_fp32_graph_matches_transformers_on_real_preprocessing(tiny_bundle, reference, config):
    for pixels in _inputs(config)[:3]:
        assert relative_max_error(_graph(tiny_bundle, "fp32").encode(pixels), reference(pixels)) <= FP32_RELATIVE_TOLERANCE


def test_safetensors_checkpoint_with_shard_tower_exports_the_same(tiny, tmp_path, config):
    bundle = tmp_path / "st"
    export_bundle(tiny.st_ckpt, bundle, ExportOptions(vision_types=("fp32",)))
    ref = Reference(tiny.tower, _projector_from_shards(tiny.st_ckpt))
    for pixels in _inputs(config)[:2]:
        assert relative_max_error(_graph(bundle, "fp32").encode(pixels), ref(pixels)) <= FP32_RELATIVE_TOLERANCE


def test_streamed_weights_are_onnx_external_data_byte_for_byte(tiny, tmp_path, reference, config, monkeypatch):
    """A 1536 px tower's graph is written with its weights streamed to the data file one tensor at a time
    (onnx_graphs.stream_weights: no second copy of the tower in memory). Forced here on the tiny tower: both files
    are byte-identical to onnx.save_model's external data from the whole ModelProto, and the graph still matches
    transformers."""
    import convllava_edge.export.convllava.onnx_export as onnx_export
    import convllava_edge.export.onnx_graphs as onnx_graphs
    from convllava_edge.export.convllava.vision_model import load_vision_model, open_vision_checkpoint

    model = load_vision_model(open_vision_checkpoint(tiny.bin_ckpt, tiny.tower))
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_THRESHOLD", 0)  # every graph goes to external data
    streamed = onnx_export.export_onnx(model, tmp_path / "streamed" / "vision.onnx", config.crop_size, config.stride)
    wrote = []
    monkeypatch.setattr(onnx_export, "stream_weights", lambda *a: wrote.append(a) or False)
    whole = onnx_export.export_onnx(model, tmp_path / "whole" / "vision.onnx", config.crop_size, config.stride)
    assert wrote, "the reference export did not take the external-data path"
    for name in ("vision.onnx", "vision.onnx.data"):
        a, b = (streamed.parent / name).read_bytes(), (whole.parent / name).read_bytes()
        assert len(a) > 0 and a == b, f"{name}: {len(a)} bytes streamed, {len(b)} from onnx.save_model"
    assert (streamed.parent / "vision.onnx.data").stat().st_size > (streamed.parent / "vision.onnx").stat().st_size
    pixels = _inputs(config)[0]
    assert relative_max_error(ConvLlavaEncoder.from_file(streamed, "cpu").encode(pixels),
                              reference(pixels)) <= FP32_RELATIVE_TOLERANCE


def test_dynamic_int8_with_shape_inference_in_place_is_onnxruntimes_file(tiny_bundle, tmp_path):
    """quantize_int8_dynamic runs the quantizer's shape inference on a weightless copy and keeps one copy of the
    weights (measured on the 1536 px tower: 8.44 GB -> 3.74 GB, the same hashes); the files must be byte-identical
    to onnxruntime.quantization's own path."""
    from convllava_edge.quantize.onnx_variants import quantize_int8_dynamic

    lean = quantize_int8_dynamic(tiny_bundle / "vision-fp32.onnx", tmp_path / "lean.onnx")
    own = quantize_int8_dynamic(tiny_bundle / "vision-fp32.onnx", tmp_path / "own.onnx", lean=False)
    assert lean.read_bytes() == own.read_bytes()
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(lean)).graph.node)


def test_fp16_min_cosine(tiny_bundle, reference, config):
    cos = np.concatenate([per_token_cosine(_graph(tiny_bundle, "fp16").encode(p), reference(p)) for p in _inputs(config)])
    assert cos.min() >= 0.999


def test_dynamic_int8_mean_cosine(tiny_bundle, reference, config):
    cos = np.concatenate([per_token_cosine(_graph(tiny_bundle, "int8").encode(p), reference(p)) for p in _inputs(config)])
    assert cos.mean() >= 0.99


def test_dynamic_int8_runs_each_gelu_as_one_op(tiny_bundle):
    # The int8 graph is onnxruntime's own: its GELUs become the contrib Gelu (test_dynamic_int8_mean_cosine
    # holds its accuracy); the fp32 graph, TensorRT's reference, keeps standard ONNX ops.
    ops = {v: collections.Counter((n.domain, n.op_type) for n in onnx.load(str(tiny_bundle / f"vision-{v}.onnx")).graph.node)
           for v in ("int8", "fp32")}
    assert ops["int8"][("com.microsoft", "Gelu")] == 12 and ops["int8"][("", "Erf")] == 0  # 11 blocks, the projector
    assert ops["fp32"][("", "Erf")] == 12 and not any(domain for domain, _ in ops["fp32"])
    assert "each GELU one Gelu op" in next(v.method for v in load_manifest(tiny_bundle).vision if v.variant == "int8")


@pytest.fixture(scope="module")
def static_int8_bundle(tiny, tmp_path_factory):
    calib = tmp_path_factory.mktemp("calib")
    for i, im in enumerate(probe_images(8, seed=21)):
        im.save(calib / f"{i}.png")
    out = tmp_path_factory.mktemp("static") / "b"
    export_bundle(tiny.bin_ckpt, out, ExportOptions(vision_types=("int8",), calibration_images=calib))
    return out


def test_static_int8_is_qdq_tensorrt_ready_and_accurate(static_int8_bundle, reference, config):
    manifest = load_manifest(static_int8_bundle)
    assert [v.variant for v in manifest.vision] == ["int8"]
    assert not (static_int8_bundle / "vision-fp32.onnx").exists()  # the reference graph is not shipped
    assert "static QDQ" in manifest.vision[0].method and manifest.vision[0].tensorrt_ready
    report = lint(static_int8_bundle / "vision-int8.onnx")
    assert report.passed, report.summary()
    assert report.op_counts["QuantizeLinear"] > 0 and "MatMulInteger" not in report.op_counts
    cos = np.concatenate([per_token_cosine(_graph(static_int8_bundle, "int8").encode(p), reference(p))
                          for p in _inputs(config)])
    assert cos.mean() >= 0.99


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_layernorm_is_a_real_op(tiny_bundle, variant):
    graph = onnx.load(str(tiny_bundle / f"vision-{variant}.onnx"))
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["LayerNormalization"] == 16  # 1 stem + 4 downsampling + 11 blocks in the tiny tower
    assert ops["ReduceMean"] == 0 and ops["Pow"] == 0 and ops["Sqrt"] == 0


def test_lint_verdicts(tiny_bundle):
    assert lint(tiny_bundle / "vision-fp32.onnx").passed
    fp16 = lint(tiny_bundle / "vision-fp16.onnx")
    assert fp16.passed, fp16.summary()
    dynamic = lint(tiny_bundle / "vision-int8.onnx")
    assert not dynamic.passed
    assert [c.name for c in dynamic.failures] == ["operators"]
    assert "MatMulInteger" in dynamic.failures[0].detail


def test_lint_catches_a_decomposed_layernorm(tmp_path):
    # A LayerNorm written the way transformers 4.x exported the channels-first ConvNeXt norm.
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
             helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Div", ["d", "s"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "ln", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "decomposed.onnx"
    onnx.save(model, str(path))
    report = lint(path)
    assert not report.passed
    assert "decomposed" in next(c for c in report.checks if c.name == "LayerNorm").detail


def test_manifest_records_accuracy_and_validation(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    assert [v.variant for v in manifest.vision] == ["fp32", "fp16", "int8"]
    fp16 = manifest.vision_entry("fp16").accuracy
    assert fp16["cosine_min"] >= 0.999 and 0 < fp16["rel_l2"] < 0.01
    assert manifest.tokens_per_image.square == 16 and manifest.n_embd == 256
    assert all(err <= 1e-4 for err in manifest.accuracy["vision_fp32_vs_pytorch"].values())
