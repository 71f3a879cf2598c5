"""checkpoint -> bundle folder, written whole or not at all.

Everything goes into a hidden temporary folder beside the target, which is renamed into place only
when complete. A failed or interrupted export removes its temporary folder and never touches an
existing bundle; ``force`` swaps an existing bundle out only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch

from .. import __version__
from ..errors import ConfigError, ExportError
from ..manifest import FileRecord, LlmEntry, Manifest, SCHEMA_VERSION, VisionEntry, write_manifest
from ..prompt import VICUNA_V1, ImageSlot, splice
from ..quantize.gguf_quant import DEFAULT_QUANT, QUANT_FTYPES, QuantReport
from ..quantize.onnx_variants import VARIANTS
from .checkpoint import TensorStore
from .gguf_convert import OUT_TYPES, GgufConversion
from .vision_export import VisionExport, export_vision
from .vision_model import open_vision_checkpoint

LLM_TYPES = tuple(QUANT_FTYPES) + tuple(OUT_TYPES)  # Q4_K_M Q4_0 Q5_K_M Q6_K Q8_0 F32 F16 BF16
AGREEMENT_QUESTIONS = ("Describe the image.", "What is in the picture?", "How many objects are there?")


class Progress(Protocol):
    def stage(self, label: str) -> None: ...
    def advance(self, done: int, total: int) -> None: ...


class SilentProgress:
    def stage(self, label: str) -> None:
        pass

    def advance(self, done: int, total: int) -> None:
        pass


@dataclass(frozen=True)
class ExportOptions:
    vision_types: tuple[str, ...] = ("fp32",)  # graphs to ship; the first is the default at run time
    llm_type: str = DEFAULT_QUANT
    calibration_images: Path | None = None  # static int8 when given, dynamic otherwise
    force: bool = False  # replace an existing bundle
    threads: int | None = None

    def validate(self) -> None:
        if not self.vision_types:
            raise ConfigError("at least one --vision-type is needed")
        for v in self.vision_types:
            if v not in VARIANTS:
                raise ConfigError(f"unknown vision type {v!r} (known: {', '.join(VARIANTS)})")
        if len(set(self.vision_types)) != len(self.vision_types):
            raise ConfigError(f"vision types repeat: {', '.join(self.vision_types)}")
        if self.llm_type not in LLM_TYPES:
            raise ConfigError(f"unknown LLM type {self.llm_type!r} (known: {', '.join(LLM_TYPES)})")
        if self.calibration_images is not None and "int8" not in self.vision_types:
            raise ConfigError("--calibration-images only applies to --vision-type int8")


@contextlib.contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, else it is removed."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:  # KeyboardInterrupt too: no half bundle is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "bundle")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(checkpoint: Path, out: Path, options: ExportOptions, vision_tower: Path | None = None,
                  progress: Progress = SilentProgress()) -> Manifest:
    options.validate()
    checkpoint = Path(checkpoint)
    if _is_llava_mini(checkpoint):
        from .bundle_mini import export_mini_bundle

        if options.calibration_images is not None:
            raise ConfigError("--calibration-images: static int8 is not available for LLaVA-Mini bundles yet "
                              "(their int8 graphs are dynamic)")
        with staging_folder(out, options.force) as tmp:
            manifest = export_mini_bundle(checkpoint, tmp, options, vision_tower, progress)
            write_manifest(tmp, manifest)
        return manifest
    ckpt = open_vision_checkpoint(checkpoint, vision_tower)
    with staging_folder(out, options.force) as tmp:
        vision = export_vision(ckpt, tmp, options.vision_types, options.calibration_images, progress.stage,
                               options.threads)
        llm_path, conversion, report = export_llm(checkpoint, tmp, options, progress)
        agreement = None
        if report is not None:
            progress.stage(f"measuring {options.llm_type} against the unquantized LLM on image prompts")
            agreement = _llm_agreement(vision, llm_path, conversion, options)
        _drop_unshipped(vision, options.vision_types)
        manifest = _manifest(tmp, checkpoint.name, vision, options.vision_types, llm_path, conversion, report, agreement)
        write_manifest(tmp, manifest)
    return manifest


def _is_llava_mini(checkpoint: Path) -> bool:
    from .config import read_json
    from .llava_mini import LLAVA_MINI_MODEL_TYPES

    return read_json(checkpoint / "config.json").get("model_type") in LLAVA_MINI_MODEL_TYPES


def export_llm(checkpoint: Path, folder: Path, options: ExportOptions,
               progress: Progress) -> tuple[Path, GgufConversion, QuantReport | None]:
    """Convert (and quantize) the LLM into ``folder``; returns the shipped file, conversion, quant report."""
    from ..quantize.gguf_quant import quantize_gguf
    from .gguf_convert import convert_llm
    from .vocab import check_tokenizer

    quantized = options.llm_type in QUANT_FTYPES
    base_type = _intermediate_type(checkpoint) if quantized else options.llm_type
    base = folder / (f"llm-{base_type.lower()}.unquantized.gguf" if quantized else f"llm-{base_type.lower()}.gguf")
    progress.stage(f"converting the LLM to GGUF {base_type}")
    conversion = convert_llm(checkpoint, base, base_type, progress=lambda i, n, name: progress.advance(i, n))
    progress.stage("checking the GGUF tokenizer against the checkpoint's")
    check_tokenizer(base, checkpoint)
    if not quantized:
        return base, conversion, None
    progress.stage(f"quantizing the LLM to {options.llm_type} (llama.cpp)")
    final = folder / f"llm-{options.llm_type.lower()}.gguf"
    report = quantize_gguf(base, final, options.llm_type, options.threads, lambda i, n, name: progress.advance(i, n))
    return final, conversion, report


def _intermediate_type(checkpoint: Path) -> str:
    """Quantize from the checkpoint's own precision: BF16 and F16 hold bf16/fp16 weights exactly."""
    store = TensorStore(checkpoint)
    dtype = store.info("model.embed_tokens.weight").dtype
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def _llm_agreement(vision: VisionExport, llm_path: Path, conversion: GgufConversion, options: ExportOptions) -> dict:
    """Quantized vs unquantized GGUF on the template's prompts with probe-image embeddings injected."""
    from ..llm import LlamaCppBackend
    from ..preprocess import preprocess
    from ..quantize.accuracy import compare_logits, sequence_logits
    from ..vision import OnnxVisionEncoder
    from .probe_images import probe_images

    fp32 = next(g for g in vision.graphs if g.variant == "fp32")
    encoder = OnnxVisionEncoder(fp32.path, "cpu", options.threads)
    images = [encoder.encode(preprocess(im, vision.preprocess)) for im in probe_images(2, seed=3)]
    ref = LlamaCppBackend(conversion.path, n_ctx=1024, threads=options.threads, kv_f32=True)
    cand = LlamaCppBackend(llm_path, n_ctx=1024, threads=options.threads, kv_f32=True)
    ref_logits, cand_logits = [], []
    for n, embeds in enumerate(images):
        slot = ImageSlot(f"probe{n}", len(embeds))
        for question in AGREEMENT_QUESTIONS:
            prompt = VICUNA_V1.render([(question, None)])
            chunks = [ref.tokenize(c, add_bos=True) for c in prompt.split("<image>")]
            items = splice(chunks, slot, ref.bos)
            ref_logits.append(sequence_logits(ref, items, {slot.key: embeds}))
            cand_logits.append(sequence_logits(cand, items, {slot.key: embeds}))
    ref.close()
    cand.close()
    conversion.path.unlink()  # the unquantized file was only needed as the reference
    return compare_logits(ref_logits, cand_logits).to_dict()


def _drop_unshipped(vision: VisionExport, vision_types: Sequence[str]) -> None:
    for g in vision.graphs:  # the fp32 graph is always made (it is the reference); drop it if not asked for
        if g.variant not in vision_types:
            for f in g.files:
                f.unlink()


def _manifest(bundle: Path, name: str, vision: VisionExport, vision_types: Sequence[str], llm_path: Path,
              conversion: GgufConversion, report: QuantReport | None, agreement: dict | None) -> Manifest:
    entries, records = [], []
    for g in (g for g in vision.graphs if g.variant in vision_types):
        files = tuple(f.relative_to(bundle).as_posix() for f in g.files)
        entries.append(VisionEntry(variant=g.variant, graph=files[0], files=files, method=g.method,
                                   tensorrt_ready=g.lint.passed,
                                   accuracy=g.accuracy.to_dict() if g.accuracy else None))
        records += [FileRecord.of(bundle, f) for f in g.files]
    records.append(FileRecord.of(bundle, llm_path))
    llm_type = report.requested if report else conversion.out_type
    tensor_types = report.tensor_types if report else conversion.tensor_types
    h, w = vision.preprocess.crop_size
    fp32 = next(g for g in vision.graphs if g.variant == "fp32")
    vocab = conversion.vocab
    return Manifest(
        schema_version=SCHEMA_VERSION, family="convllava", name=name, created_with=f"convllava-edge {__version__}",
        files=tuple(records), preprocess={**vision.preprocess.to_dict(), "aspect": "pad"}, n_embd=vision.n_embd,
        tokens_per_image={"stride": vision.stride, "rule": f"(H / {vision.stride}) * (W / {vision.stride})",
                          "square": (h // vision.stride) * (w // vision.stride)},
        vision=tuple(entries), tower=vision.tower,
        llm=LlmEntry(file=llm_path.name, type=llm_type, tensor_types=tensor_types,
                     n_ctx_train=conversion.context_length, fallbacks=len(report.fallbacks) if report else 0),
        template=VICUNA_V1.to_dict(),
        tokenizer={"kind": "sentencepiece", "add_space_prefix": vocab.add_space_prefix,
                   "space_after_special": vocab.legacy},
        accuracy={"vision_fp32_vs_pytorch": {f"{r.height}x{r.width}": r.rel_error for r in fp32.validation},
                  "vision_fp32_tolerance": fp32.validation[0].tolerance if fp32.validation else None,
                  "llm_vs_unquantized": agreement,
                  "llm_fallback_warning": report.warning() if report else None},
        source={"checkpoint": name, "notes": vision.notes},
    )
