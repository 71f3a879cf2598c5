"""checkpoint -> bundle: the one assembler every model family goes through.

detect the family (config.json) -> open and check the checkpoint -> staging folder -> the family's vision
graphs -> the LLM (GGUF, quantized by llama.cpp; and/or in Hugging Face form, llm-hf/) -> the LLM's agreement
with its unquantized self, where the family measures it -> one manifest -> the folder renamed into place (staging.py: whole or not at all).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from .. import __version__
from ..errors import ConfigError
from ..manifest import (FileRecord, LlmEntry, LlmHfEntry, Manifest, SCHEMA_VERSION, TokensPerImage, VisionEntry,
                        write_manifest)
from ..quantize.gguf_quant import DEFAULT_QUANT, QUANT_FTYPES, QuantReport
from ..quantize.onnx_variants import VARIANTS
from ..vision import VISION_GATE, accuracy_cosines, gate_passed
from .checkpoint import TensorStore
from .families import ExportFamily, VisionResult, export_family_for
from .gguf_convert import OUT_TYPES, GgufConversion
from .isolated import worth_isolating
from .model_card import write_card
from .sources import resolve_sources
from .staging import check_out, staging_folder

LLM_TYPES = tuple(QUANT_FTYPES) + tuple(OUT_TYPES)  # Q4_K_M Q4_0 Q5_K_M Q6_K Q8_0 F32 F16 BF16
VOCAB_GGUF = "llm-vocab.gguf"
HF = "hf"  # --llm-type hf: the LLM as a Hugging Face folder (vLLM), alone or beside one GGUF type


class Progress(Protocol):
    def stage(self, label: str) -> None: ...
    def advance(self, done: int, total: int) -> None: ...


class SilentProgress:
    def stage(self, label: str) -> None:
        pass

    def advance(self, done: int, total: int) -> None:
        pass


# What `export` ships when no --vision-type is given: a quantized type, so that the user's machine has a fast one
# to run and --vision-backend auto one to choose (the export's machine is not the user's). fp32 is always made
# (it is the reference of every other type) and ships first only where int8 misses check's vision gate.
DEFAULT_VISION_TYPES = ("int8",)


@dataclass(frozen=True)
class ExportOptions:
    vision_types: tuple[str, ...] | None = None  # graphs to ship, the first the default at run time; None: the default
    # (DEFAULT_VISION_TYPES, with fp32 in front where they miss the vision gate on the probe images)
    llm_type: str | None = DEFAULT_QUANT  # the GGUF's type; None: no GGUF (then hf)
    hf: bool = False  # also (or only) the LLM in Hugging Face form, llm-hf/
    calibration_images: Path | None = None  # static int8 when given, dynamic otherwise
    force: bool = False  # replace an existing bundle
    threads: int | None = None

    @property
    def shipping(self) -> tuple[str, ...]:
        """The types asked for, or the default's."""
        return DEFAULT_VISION_TYPES if self.vision_types is None else self.vision_types

    def validate(self) -> None:
        if self.vision_types is not None and not self.vision_types:
            raise ConfigError("at least one --vision-type is needed")
        for v in self.shipping:
            if v not in VARIANTS:
                raise ConfigError(f"unknown vision type {v!r} (known: {', '.join(VARIANTS)})")
        if len(set(self.shipping)) != len(self.shipping):
            raise ConfigError(f"vision types repeat: {', '.join(self.vision_types)}")
        if self.llm_type is None and not self.hf:
            raise ConfigError("no LLM to export: give --llm-type (a GGUF type, hf, or both)")
        if self.llm_type is not None and self.llm_type not in LLM_TYPES:
            raise ConfigError(f"unknown LLM type {self.llm_type!r} (known: {', '.join(LLM_TYPES + (HF,))})")
        if self.calibration_images is not None and "int8" not in self.shipping:
            raise ConfigError("--calibration-images only applies to --vision-type int8")


def export_bundle(checkpoint: str | Path, out: Path, options: ExportOptions, vision_tower: str | Path | None = None,
                  progress: Progress = SilentProgress()) -> Manifest:
    """``checkpoint`` and ``vision_tower``: folders, or Hugging Face repo ids (ORG/NAME[@REVISION], sources.py)."""
    options.validate()
    protect = {role: Path(p) for role, p in (("the checkpoint", checkpoint), ("the vision tower", vision_tower),
                                             ("the calibration images", options.calibration_images)) if p is not None}
    check_out(Path(out), options.force, protect)  # before any work: a refusal costs nothing
    sources = resolve_sources(checkpoint, vision_tower)  # repo ids: downloaded (or found in the hub cache) now
    checkpoint, vision_tower = sources.checkpoint, sources.vision_tower
    name = sources.name or checkpoint.name
    family = export_family_for(checkpoint)
    opened = family.open(checkpoint, vision_tower, options)  # its errors before any folder or work
    isolate = family.vision_in_child and worth_isolating(checkpoint, vision_tower)
    if isolate:
        opened = None  # the child opens it again: nothing of the checkpoint stays open here
    with staging_folder(out, options.force, protect) as tmp:
        if options.vision_types is None:  # fp32 is made anyway: whether it ships is decided on the measured figures
            vision = export_vision(family, opened, checkpoint, vision_tower, tmp,
                                   replace(options, vision_types=DEFAULT_VISION_TYPES + ("fp32",)), progress, isolate)
            vision = default_types(vision, progress)
        else:
            vision = export_vision(family, opened, checkpoint, vision_tower, tmp, options, progress, isolate)
        options = replace(options, vision_types=tuple(v.variant for v in vision.vision))
        llm_path = conversion = report = agreement = hf = None
        if options.llm_type is not None:
            llm_path, conversion, report = export_llm(family, checkpoint, tmp, options, progress, name)
        if options.hf:
            hf = export_hf(family, checkpoint, tmp, progress)
        if report is not None and family.measures_agreement:
            progress.stage(f"measuring {options.llm_type} against the unquantized LLM on image prompts")
            agreement = family.llm_agreement(vision, llm_path, conversion, options)
        if report is not None:
            conversion.path.unlink()  # the unquantized file was only needed as the reference
        for f in vision.unshipped:  # the fp32 graph is always made (it is the reference); dropped if not asked for
            f.unlink()
        manifest = build_manifest(tmp, name, family, vision, llm_path, conversion, report, agreement,
                                  vision_tower, hf, sources.hub)
        write_manifest(tmp, manifest)
        write_card(tmp, manifest, sources.base_model, sources.card_license)
    return manifest


def export_vision(family: ExportFamily, opened, checkpoint: Path, vision_tower: Path | None, folder: Path,
                  options: ExportOptions, progress: Progress, isolate: bool) -> VisionResult:
    """The family's vision graphs; with ``isolate`` in a process of their own (isolated.py): the tower, torch.onnx's
    program and ONNX Runtime's arenas are gone before the LLM is converted."""
    if not isolate:
        return family.export_vision(opened, folder, options, progress)
    from .isolated import run_isolated

    return run_isolated(_vision_child, (family.name, checkpoint, vision_tower, folder, options), progress,
                        "vision export")


def _vision_child(family_name: str, checkpoint: Path, vision_tower: Path | None, folder: Path,
                  options: ExportOptions, progress: Progress) -> VisionResult:
    from .families import export_family_named

    family = export_family_named(family_name)
    return family.export_vision(family.open(checkpoint, vision_tower, options), folder, options, progress)


def default_types(vision: VisionResult, progress: Progress) -> VisionResult:
    """The default's types where every one is within check's vision gate; else fp32 ships in front of them (the
    bundle's default), said in the notes and the progress."""
    fp32 = next(v for v in vision.vision if v.variant == "fp32")
    quantized = [v for v in vision.vision if v.variant != "fp32"]
    missed = [(v.variant, *accuracy_cosines(v.variant, v.accuracy)) for v in quantized
              if not gate_passed(v.variant, v.accuracy)]
    if not missed:
        return replace(vision, vision=quantized, unshipped=vision.unshipped + list(fp32.files))
    said = ", ".join(f"{name} cosine mean {mean:.4f}, min {low:.4f}" for name, mean, low in missed)
    note = (f"{said} on the probe images: under the vision gate (mean >= {VISION_GATE['cosine_mean']}, "
            f"min >= {VISION_GATE['cosine_min']}), so fp32 ships first and is the default")
    progress.stage(note)
    return replace(vision, vision=[fp32, *quantized], notes=[*vision.notes, note])


def export_llm(family: ExportFamily, checkpoint: Path, folder: Path, options: ExportOptions,
               progress: Progress, name: str | None = None) -> tuple[Path, GgufConversion, QuantReport | None]:
    """Convert (and quantize) the LLM into ``folder``; returns the shipped file, conversion, quant report."""
    from ..quantize.gguf_quant import quantize_gguf
    from .gguf_convert import convert_llm
    from .vocab import check_tokenizer

    quantized = options.llm_type in QUANT_FTYPES
    base_type = _intermediate_type(checkpoint) if quantized else options.llm_type
    base = folder / (f"llm-{base_type.lower()}.unquantized.gguf" if quantized else f"llm-{base_type.lower()}.gguf")
    progress.stage(f"converting the LLM to GGUF {base_type}")
    conversion = convert_llm(checkpoint, base, base_type, progress=lambda i, n, _: progress.advance(i, n),
                             name=name, config=family.llm_config(checkpoint))
    progress.stage("checking the GGUF tokenizer against the checkpoint's")
    check_tokenizer(base, checkpoint)
    if not quantized:
        return base, conversion, None
    progress.stage(f"quantizing the LLM to {options.llm_type} (llama.cpp)")
    final = folder / f"llm-{options.llm_type.lower()}.gguf"
    report = quantize_gguf(base, final, options.llm_type, options.threads, lambda i, n, name: progress.advance(i, n))
    return final, conversion, report


@dataclass(frozen=True)
class HfWritten:
    files: list[Path]
    dtype: str
    context_length: int
    vocab: object  # export.vocab.Vocab: the tokenizer entry when no GGUF is written
    vocab_file: Path  # llm-vocab.gguf: the vocabulary alone, for the vLLM backend's tokenization


def export_hf(family: ExportFamily, checkpoint: Path, folder: Path, progress: Progress) -> HfWritten:
    """The LLM as a Hugging Face LlamaForCausalLM folder, llm-hf/ (export/hf_llm.py), and its vocabulary as a
    GGUF without tensors, llm-vocab.gguf: the vLLM backend tokenizes with llama.cpp as the GGUF backend does,
    with or without a GGUF LLM beside it."""
    from .gguf_convert import write_vocab_gguf
    from .hf_llm import write_hf_llm

    progress.stage("writing the LLM in Hugging Face form (llm-hf/)")
    config = family.llm_config(checkpoint)
    llm, max_length, skip = config
    files, dtype = write_hf_llm(checkpoint, folder, llm, skip, lambda i, n, name: progress.advance(i, n))
    vocab_file = folder / VOCAB_GGUF
    vocab = write_vocab_gguf(checkpoint, vocab_file, config)
    return HfWritten(files, dtype, min(llm.max_position_embeddings, max_length), vocab, vocab_file)


def _intermediate_type(checkpoint: Path) -> str:
    """Quantize from the checkpoint's own precision: BF16 and F16 hold bf16/fp16 weights exactly."""
    store = TensorStore(checkpoint)
    dtype = store.info("model.embed_tokens.weight").dtype
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def build_manifest(bundle: Path, name: str, family: ExportFamily, vision: VisionResult, llm_path: Path,
                   conversion: GgufConversion | None, report: QuantReport | None, agreement: dict | None,
                   vision_tower: Path | None = None, hf: HfWritten | None = None, hub: tuple = ()) -> Manifest:
    """The one manifest builder: the family's fields, the files as written, the LLM as quantized."""
    entries, records, recorded = [], [], set()
    for v in vision.vision:
        files = tuple(f.relative_to(bundle).as_posix() for f in v.files)
        parts = {role: p.relative_to(bundle).as_posix() for role, p in v.parts.items()}
        entries.append(VisionEntry(variant=v.variant, graph=parts.get(next(iter(parts), ""), files[0]), files=files,
                                   method=v.method, tensorrt_ready=v.tensorrt_ready, accuracy=v.accuracy, parts=parts))
        records += [FileRecord.of(bundle, f) for f in v.files if f not in recorded]  # bf16 shares fp32's files
        recorded.update(v.files)
    if llm_path is not None:
        records.append(FileRecord.of(bundle, llm_path))
    if hf is not None:
        records += [FileRecord.of(bundle, f) for f in hf.files + [hf.vocab_file]]
    accuracy = dict(vision.accuracy)
    if family.measures_agreement:
        accuracy["llm_vs_unquantized"] = agreement
    accuracy["llm_fallback_warning"] = report.warning() if report else None
    source = {"checkpoint": name, "notes": vision.notes}
    if vision_tower is not None:  # check --reference CHECKPOINT finds the tower again
        source["vision_tower"] = str(Path(vision_tower).resolve())
    if hub:  # each repo the export read: role, repo, revision and commit
        source["hub"] = [dict(h) for h in hub]
    return Manifest(
        schema_version=SCHEMA_VERSION, family=family.name, name=name, created_with=f"convllava-edge {__version__}",
        files=tuple(records), preprocess=vision.preprocess, n_embd=vision.n_embd,
        tokens_per_image=TokensPerImage.from_dict(vision.tokens_per_image, "export"), vision=tuple(entries),
        tower=vision.tower,
        llm=None if llm_path is None else LlmEntry(
            file=llm_path.name, type=report.requested if report else conversion.out_type,
            tensor_types=report.tensor_types if report else conversion.tensor_types,
            n_ctx_train=conversion.context_length, fallbacks=len(report.fallbacks) if report else 0),
        llm_hf=None if hf is None else LlmHfEntry(
            folder=hf.files[0].parent.name, files=tuple(f.relative_to(bundle).as_posix() for f in hf.files),
            dtype=hf.dtype, n_ctx_train=hf.context_length, vocab=hf.vocab_file.name),
        template=vision.template.to_dict(), tokenizer=family.tokenizer_info(conversion.vocab if conversion else hf.vocab),
        accuracy=accuracy, source=source)
