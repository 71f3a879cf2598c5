"""The vision side of an export: fp32 graph, variants, validation, accuracy and lint, in one pass.

Every graph is checked right after it is written: the fp32 graph against PyTorch (tolerance
FP32_TOLERANCE, at a square and two non-square shapes), each variant against the fp32 graph on probe
images (per-token cosine and relative L2), and every graph by the TensorRT lint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...metrics import EmbeddingAgreement, compare_embeddings
from ...preprocess import PreprocessConfig, preprocess
from ...families.convllava import ConvLlavaEncoder
from ..onnx_graphs import graph_files
from ..isolated import release_freed_memory, run_isolated, worth_isolating
from .onnx_export import ValidationResult, export_onnx, torch_outputs, validate_onnx
from ..probe_images import images_in, probe_images
from ..trt_lint import LintReport, lint
from .vision_model import VisionCheckpoint, load_vision_model, open_vision_checkpoint

N_PROBE_IMAGES = 6  # accuracy figures are pooled over this many images (x 16 to 576 tokens each)
MAX_CALIBRATION_IMAGES = 64

Progress = Callable[[str], None]


@dataclass
class VisionGraph:
    variant: str  # fp32 | fp16 | int8 | bf16 (the fp32 graph's own file)
    path: Path
    method: str
    lint: LintReport
    accuracy: EmbeddingAgreement | None = None  # against the fp32 graph; None for fp32 itself
    validation: list[ValidationResult] = field(default_factory=list)  # fp32 against PyTorch

    @property
    def files(self) -> list[Path]:
        return graph_files(self.path)


@dataclass
class VisionExport:
    preprocess: PreprocessConfig
    n_embd: int
    stride: int
    graphs: list[VisionGraph]
    notes: list[str]
    tower: dict  # architecture summary for the manifest: depths, hidden_sizes, patch_size, projector


def validation_shapes(config: PreprocessConfig) -> list[tuple[int, int]]:
    """The square training shape and a wide and a tall one, all multiples of the stride."""
    h, w = config.crop_size
    s = config.stride
    return [(h, w), (h, max(s, (w // 2) // s * s)), (max(s, (h * 3 // 4) // s * s), w)]


class _Stages:
    """This module's progress (a callable) as the Progress run_isolated's child reports to."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def stage(self, label: str) -> None:
        self.progress(label)

    def advance(self, done: int, total: int) -> None:
        pass


def _torch_side(ckpt: VisionCheckpoint | Path, tower: Path | None, fp32_path: Path, inputs: list[np.ndarray],
                progress) -> list[tuple[np.ndarray, np.ndarray]]:
    """The PyTorch module: the fp32 graph written from it, and its outputs on ``inputs`` (what the graph is validated
    against). ``ckpt`` is an opened checkpoint, or its folder (and ``tower``'s) to open here, in a child."""
    if not isinstance(ckpt, VisionCheckpoint):
        ckpt = open_vision_checkpoint(ckpt, tower)
    config = ckpt.tower.preprocess
    progress.stage("loading the vision tower and projector")
    model = load_vision_model(ckpt)
    progress.stage("exporting the fp32 graph")
    export_onnx(model, fp32_path, config.crop_size, config.stride)
    progress.stage(f"validating the fp32 graph against PyTorch at {', '.join(f'{x.shape[2]}x{x.shape[3]}' for x in inputs)}")
    return torch_outputs(model, inputs)


def export_vision(ckpt: VisionCheckpoint, out_dir: Path, variants: Sequence[str] = ("fp32",),
                  calibration_dir: Path | None = None, progress: Progress = lambda msg: None,
                  threads: int | None = None) -> VisionExport:
    # quantize/ is imported lazily: it pulls onnxruntime tools
    from ...quantize.onnx_variants import BF16_METHOD, bf16_backend, make_variant

    config = ckpt.tower.preprocess
    rng = np.random.default_rng(0)
    shapes = validation_shapes(config)
    inputs = [rng.normal(0, 1, size=(1, 3, h, w)).astype(np.float32) for h, w in shapes]
    fp32_path = out_dir / "vision-fp32.onnx"
    sources = (ckpt.store.folder, ckpt.tower.store.folder if ckpt.tower.prefix == "" else None)
    if worth_isolating(*sources):
        # PyTorch's side in a process of its own: after torch.onnx, onnxscript's rewriter keeps the last graph it
        # matched in a module-level rule, and with it every parameter of the tower (2.8 GB at 1536 px): only the
        # process's end returns them. ONNX Runtime's sessions below then have the memory to themselves.
        expected = run_isolated(_torch_side, (*sources, fp32_path, inputs), _Stages(progress), "PyTorch export")
    else:
        expected = _torch_side(ckpt, None, fp32_path, inputs, _Stages(progress))
    release_freed_memory()
    validation = validate_onnx(fp32_path, expected, inputs, threads=threads)
    graphs = [VisionGraph("fp32", fp32_path, "fp32, exported by torch.onnx (dynamo)", lint(fp32_path),
                          validation=validation)]

    calibration = None
    if calibration_dir is not None:
        calibration = [preprocess(im, config) for im in images_in(calibration_dir, MAX_CALIBRATION_IMAGES)]
    probes = [preprocess(im, config, aspect) for im, aspect in
              zip(probe_images(N_PROBE_IMAGES, seed=1), ["pad", "pad", "pad", "pad", "native", "native"])]
    reference = []
    if any(v != "fp32" for v in variants):
        fp32_encoder = ConvLlavaEncoder.from_file(fp32_path, "cpu", threads)  # one session for every probe
        reference = [fp32_encoder.encode(p) for p in probes]
        del fp32_encoder  # before the quantizer needs its memory
    for variant in variants:
        if variant == "fp32":
            continue
        if variant == "bf16":
            progress("measuring the fp32 graph in bf16 arithmetic")
            path, method = fp32_path, BF16_METHOD
            encoder = ConvLlavaEncoder.from_file(path, backend=bf16_backend(threads))
        else:
            progress(f"making the {variant} graph")
            path, method = make_variant(variant, fp32_path, out_dir / f"vision-{variant}.onnx",
                                        calibration if variant == "int8" else None)
            encoder = ConvLlavaEncoder.from_file(path, "cpu", threads)
        accuracy = compare_embeddings([encoder.encode(p) for p in probes], reference)
        del encoder
        graphs.append(VisionGraph(variant, path, method, lint(path), accuracy=accuracy))
    order = {v: i for i, v in enumerate(variants)}
    graphs.sort(key=lambda g: order.get(g.variant, len(order)))
    tc = ckpt.tower.config
    tower = {"depths": list(tc.depths), "hidden_sizes": list(tc.hidden_sizes), "patch_size": tc.patch_size,
             "projector": ckpt.llava.mm.projector_type}
    return VisionExport(config, ckpt.llava.llm.hidden_size, config.stride, graphs, list(ckpt.notes), tower)
