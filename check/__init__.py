"""``convllava-edge check``: what each quantization costs, stage by stage, with gates for CI.

inputs.py (images, questions and their scoring) -> references.py / torch_reference.py (what is compared
against) -> stages.py (vision, llm, answers: figures and gates each) -> report.py (Markdown and a chart).
Every reference is never the thing measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..families import family_for
from ..manifest import load_manifest
from ..preprocess import preprocess
from ..prompt import template_from_dict
from .inputs import CheckInputs, CheckQuestion, default_inputs, exact_match, load_inputs
from ..manifest import MANIFEST_NAME
from .references import BundleReference, Reference
from .report import write_report
from .stages import GATES, Context, GateResult, answers_stage, llm_stage, parse_gates, prepare_prompts, vision_stage


def open_reference(path: Path | None, threads: int | None, vision_tower: Path | None = None) -> Reference:
    """The reference at ``path``: None (the bundle itself), a bundle folder, or a checkpoint folder."""
    if vision_tower is not None and (path is None or (Path(path) / MANIFEST_NAME).is_file()):
        raise ConfigError("--vision-tower goes with --reference CHECKPOINT (a bundle's graphs already hold a tower)")
    if path is None:
        return Reference(None, threads)
    if (Path(path) / MANIFEST_NAME).is_file():
        return BundleReference(Path(path), threads)
    from .torch_reference import CheckpointReference  # torch, transformers: the export extra

    return CheckpointReference(Path(path), threads, vision_tower)


@dataclass
class CheckResult:
    bundle: str
    reference: dict[str, Any]
    inputs: dict[str, Any]
    vision: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # variant name -> bytes
    samples: list[dict] = field(default_factory=list)  # the first answers as shown (report.md; not in the JSON)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "reference": self.reference, "inputs": self.inputs, "vision": self.vision,
                "llm": self.llm, "answers": self.answers, "sizes": self.sizes, "passed": self.passed,
                "gates": [{"name": g.name, "stage": g.stage, "subject": g.subject, "value": g.value,
                           "threshold": g.threshold, "passed": g.passed} for g in self.gates]}


def run_check(bundle: Path, inputs: CheckInputs, reference_path: Path | None = None, gates: dict[str, float] | None = None,
              threads: int | None = None, nf4: bool = True, progress: Callable[[str, int, int], None] = lambda *a: None,
              vision_tower: Path | None = None) -> CheckResult:
    """``vision_tower``: the tower folder of a checkpoint reference (default: the one the bundle was
    exported from, when it is still there; else the copy in the checkpoint's shards)."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    if manifest.llm is None and manifest.llm_hf is not None:
        raise ConfigError(f"{bundle}: check reads the LLM's logits from llama.cpp, and this bundle holds its LLM in "
                          "Hugging Face form only: export it with a GGUF --llm-type too (e.g. --llm-type Q4_K_M)")
    if manifest.llm is None or manifest.template is None:
        raise ConfigError(f"{bundle}: bundle has no LLM")
    reference = open_reference(reference_path, threads, vision_tower)
    config = manifest.preprocess
    ctx = Context(bundle=bundle, manifest=manifest, family=family_for(manifest.family),
                  template=template_from_dict(manifest.template), inputs=inputs, reference=reference,
                  thresholds=gates if gates is not None else parse_gates([]), threads=threads, progress=progress,
                  pixels={name: preprocess(image, config, config.aspect)
                          for name, image in inputs.images.items()})
    result = CheckResult(bundle=str(bundle), reference={"kind": reference.kind, "path": str(reference_path or bundle)},
                         inputs={"source": inputs.source, "n_images": len(inputs.images),
                                 "n_questions": len(inputs.questions), "text": inputs.text is not None,
                                 "scoring": inputs.scoring})
    result.vision, vision_gates = vision_stage(ctx)
    prepare_prompts(ctx)
    try:
        result.llm, llm_gates = llm_stage(ctx, nf4)
        result.answers, answer_gates = answers_stage(ctx)
    finally:
        for llm in {id(v): v for v in [*ctx.llms.values(), ctx.ref_llm] if v is not None}.values():
            llm.close()
    result.gates = vision_gates + llm_gates + answer_gates
    result.sizes, result.samples = ctx.sizes, ctx.samples
    size = reference.size()
    if size is not None:
        result.reference["size"] = size
    return result


__all__ = ["GATES", "CheckInputs", "CheckQuestion", "CheckResult", "GateResult", "default_inputs", "exact_match",
           "load_inputs", "parse_gates", "run_check", "write_report"]
