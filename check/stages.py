"""``check``'s stages. Each takes the shared context and returns its figures and its gates.

- vision: every vision variant of the bundle against the fp32 reference on the same images: per-token
  cosine (mean, min) and relative L2 of the tower features and of the vision output;
- llm: the bundle's LLM against the reference LLM on image-conditioned prompts, both fed the same
  reference vision output: KL of the next-token distributions (mean, 99th percentile), top-1
  agreement, perplexity on a text; with a checkpoint, transformers + bitsandbytes NF4 beside it;
- answers: greedy answers of each vision x LLM combination against the reference combination: exact
  and first-token agreement on the answers' visible tokens, and accuracy when the questions carry
  expected answers (scored by the question set's rule, the text cut where the template's stops say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..decoding import TextStream
from ..errors import ConfigError
from ..families import Family
from ..manifest import Manifest, resolve_inside
from ..metrics import compare_embeddings
from ..prompt import ImageSlot, Item
from ..quantize.accuracy import compare_logits
from ..tokenizer import PromptTokenizer
from ..vision import VISION_GATE, open_encoder, runnable_kind
from .inputs import CheckInputs
from .references import BundleLlm, Reference

# Gate name -> (default threshold, higher is better). Vision gates apply to the projected embeddings
# (what the LLM receives). Defaults: the vision issue's int8 bar for cosine; a KL and top-1 budget a
# 4-bit LLM meets on trained models; answers may not lose more than 2 points of accuracy.
GATES: dict[str, tuple[float, bool]] = {
    "vision.cosine_mean": (VISION_GATE["cosine_mean"], True),  # also what --vision-backend auto may choose
    "vision.cosine_min": (VISION_GATE["cosine_min"], True),
    "vision.rel_l2": (0.15, False),
    "llm.kl_mean": (0.05, False),
    "llm.kl_p99": (0.5, False),
    "llm.top1": (0.90, True),
    "answers.first_token": (0.90, True),
    "answers.exact": (0.80, True),
    "answers.accuracy_drop": (0.02, False),
}
N_SAMPLES = 5  # answers shown side by side in the result (reference and each combination)


@dataclass
class GateResult:
    name: str
    stage: str
    subject: str
    value: float
    threshold: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def message(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{self.stage} {self.subject}: {self.name.split('.', 1)[1]} {self.value:.4g} (gate {op} {self.threshold:g})"


def parse_gates(specs) -> dict[str, float]:
    """["llm.kl_mean=0.1", ...] over the defaults; unknown names and bad values are errors."""
    gates = {name: threshold for name, (threshold, _) in GATES.items()}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise ConfigError(f"--gate {spec!r}: expected NAME=VALUE")
        if name not in GATES:
            raise ConfigError(f"--gate {spec!r}: unknown gate {name!r} (known: {', '.join(GATES)})")
        try:
            gates[name] = float(value)
        except ValueError:
            raise ConfigError(f"--gate {spec!r}: {value!r} is not a number") from None
    return gates


@dataclass
class Context:
    """What the stages share: the bundle, its family, the inputs, the reference and what earlier stages made."""

    bundle: Path
    manifest: Manifest
    family: Family
    template: Any
    inputs: CheckInputs
    reference: Reference
    thresholds: dict[str, float]
    pixels: dict[str, np.ndarray]
    threads: int | None
    progress: Callable[[str, int, int], None]
    sizes: dict[str, int] = field(default_factory=dict)
    encoders: dict[str, Any] = field(default_factory=dict)  # vision variant -> encoder
    ref_encoder: Any = None
    ref_name: str = ""
    ref_vision: dict[str, np.ndarray] = field(default_factory=dict)  # slot key -> the reference vision output
    candidate: BundleLlm | None = None
    tokenizer: PromptTokenizer | None = None
    hidden_prefix: list[int] = field(default_factory=list)
    prompts: list[tuple[Any, list[Item]]] = field(default_factory=list)
    ref_rows: list[np.ndarray | None] = field(default_factory=list)
    ref_llm: Any = None
    llms: dict[str, Any] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # the first answers as shown, reference and each combination

    def gate(self, name: str, stage: str, subject: str, value: float) -> GateResult:
        return GateResult(name, stage, subject, value, self.thresholds[name], GATES[name][1])

    def rows_with(self, encoder, vision_by_key: dict[str, np.ndarray]) -> list[np.ndarray | None]:
        """Each prompt's LLM input rows where the family fuses the prompt (else None: tokens + image rows)."""
        return [self.family.llm_rows(encoder, items, vision_by_key) for _, items in self.prompts]


def vision_stage(ctx: Context) -> tuple[dict, list[GateResult]]:
    ctx.ref_name, ctx.ref_encoder = ctx.reference.vision_encoder(ctx.bundle, ctx.manifest)
    ref_out = {}
    for i, (name, p) in enumerate(ctx.pixels.items()):
        ctx.progress("vision: reference", i, len(ctx.pixels))
        ref_out[name] = ctx.ref_encoder.encode_both(p)
    ctx.ref_vision = {f"img:{name}": vision for name, (_, vision) in ref_out.items()}
    figures, gates = {"reference": ctx.ref_name, "variants": {}}, []
    sizes = {f.path: f.size for f in ctx.manifest.files}
    for entry in ctx.manifest.vision:
        ctx.encoders[entry.variant] = open_encoder(ctx.bundle, ctx.manifest, entry, "cpu", ctx.threads,
                                                   kind=runnable_kind(entry, "cpu"))  # bf16: OpenVINO
        ctx.sizes[f"vision {entry.variant}"] = sum(sizes[f] for f in entry.files)
        if ctx.reference.kind == "self" and entry.variant == "fp32":
            continue  # the reference itself
        outs = []
        for i, (name, p) in enumerate(ctx.pixels.items()):
            ctx.progress(f"vision: {entry.variant}", i, len(ctx.pixels))
            outs.append((name, ctx.encoders[entry.variant].encode_both(p)))
        feats = compare_embeddings([o[0] for _, o in outs], [ref_out[n][0] for n, _ in outs])
        embeds = compare_embeddings([o[1] for _, o in outs], [ref_out[n][1] for n, _ in outs])
        figures["variants"][entry.variant] = {"features": feats.to_dict(), "embeds": embeds.to_dict()}
        gates += [ctx.gate(f"vision.{f}", "vision", entry.variant, getattr(embeds, f))
                  for f in ("cosine_mean", "cosine_min", "rel_l2")]
    return figures, gates


def prepare_prompts(ctx: Context) -> None:
    """The bundle's LLM, its tokenizer, and every question as prompt items (the runtime's own pieces)."""
    ctx.candidate = BundleLlm(ctx.manifest.llm.type, resolve_inside(ctx.bundle, ctx.manifest.llm.file), ctx.threads)
    ctx.sizes[f"LLM {ctx.manifest.llm.type}"] = {f.path: f.size for f in ctx.manifest.files}[ctx.manifest.llm.file]
    ctx.tokenizer = PromptTokenizer(ctx.candidate.backend, ctx.manifest.tokenizer)
    header = getattr(ctx.template, "answer_header", "")
    ctx.hidden_prefix = ctx.candidate.backend.tokenize(header, parse_special=True) if header else []
    for q in ctx.inputs.questions:
        key = f"img:{q.image}"
        slot = ImageSlot(key, ctx.family.slot_size(ctx.manifest, ctx.ref_vision[key]))
        ctx.prompts.append((q, ctx.tokenizer.items(ctx.template.render([(q.question, None)]), slot)))
    ctx.ref_rows = ctx.rows_with(ctx.ref_encoder, ctx.ref_vision)
    backend = ctx.candidate.backend
    ctx.ref_llm = ctx.reference.llm(backend.piece, backend.is_end)
    ctx.llms = {ctx.manifest.llm.type: ctx.candidate}


def llm_stage(ctx: Context, nf4: bool) -> tuple[dict, list[GateResult]]:
    if ctx.ref_llm is None:
        return {"reference": None, "note": "no LLM reference: pass --reference BUNDLE (F16/F32) or CHECKPOINT",
                "export_time": ctx.manifest.accuracy.get("llm_vs_unquantized"), "variants": {}}, []
    figures: dict = {}
    if nf4 and hasattr(ctx.reference, "nf4_llm"):
        try:
            ctx.llms["bnb-nf4"] = ctx.reference.nf4_llm(ctx.candidate.backend.piece, ctx.candidate.backend.is_end)
        except (ConfigError, ImportError, RuntimeError) as e:
            figures["nf4_skipped"] = str(e).splitlines()[0]
    figures.update({"reference": ctx.ref_llm.name, "variants": {}})
    gates = []
    ref_logits = []
    for i, (_, items) in enumerate(ctx.prompts):
        ctx.progress("llm: reference", i, len(ctx.prompts))
        ref_logits.append(ctx.ref_llm.logits(items, ctx.ref_vision, ctx.ref_rows[i]))
    text = ctx.inputs.text
    ref_ppl = perplexity(ctx.ref_llm, ctx.tokenizer, text) if text else None
    for name, llm in ctx.llms.items():
        cand_logits = []
        for i, (_, items) in enumerate(ctx.prompts):
            ctx.progress(f"llm: {name}", i, len(ctx.prompts))
            cand_logits.append(llm.logits(items, ctx.ref_vision, ctx.ref_rows[i]))
        agreement = compare_logits(ref_logits, cand_logits).to_dict()
        if text:
            ppl = perplexity(llm, ctx.tokenizer, text)
            agreement.update({"perplexity": ppl, "perplexity_reference": ref_ppl, "perplexity_change": ppl / ref_ppl - 1})
        figures["variants"][name] = agreement
        gates += [ctx.gate(f"llm.{f}", "llm", name, agreement[f]) for f in ("kl_mean", "kl_p99", "top1")]
    return figures, gates


def answers_stage(ctx: Context) -> tuple[dict, list[GateResult]]:
    answer_ref = ctx.ref_llm if ctx.ref_llm is not None else ctx.candidate
    stops = ctx.template.stop
    combos: dict[str, tuple[dict[str, np.ndarray], Any, list]] = {}
    for variant, encoder in ctx.encoders.items():
        vision = {f"img:{n}": encoder.encode(p) for n, p in ctx.pixels.items()}
        combos[f"{variant} + {ctx.manifest.llm.type}"] = (vision, ctx.candidate, ctx.rows_with(encoder, vision))
    if "bnb-nf4" in ctx.llms:
        combos["fp32 + bnb-nf4"] = (ctx.ref_vision, ctx.llms["bnb-nf4"], ctx.ref_rows)
    reference = []
    for i, (q, items) in enumerate(ctx.prompts):
        ctx.progress("answers: reference", i, len(ctx.prompts))
        reference.append(answer_ref.answer(items, ctx.ref_vision, stops, ctx.hidden_prefix, ctx.ref_rows[i]))
    texts = {"reference": [answer_text(ctx, ids) for ids in reference]}
    ref_acc = accuracy(ctx.inputs, texts["reference"])
    figures = {"reference": f"{ctx.ref_name} + {answer_ref.name}", "reference_accuracy": ref_acc, "combinations": {}}
    gates = []
    for combo, (vision, llm, rows) in combos.items():
        answers = []
        for i, (q, items) in enumerate(ctx.prompts):
            ctx.progress(f"answers: {combo}", i, len(ctx.prompts))
            answers.append(llm.answer(items, vision, stops, ctx.hidden_prefix, rows[i]))
        texts[combo] = [answer_text(ctx, ids) for ids in answers]
        exact = float(np.mean([a == r for a, r in zip(answers, reference)]))
        first = float(np.mean([a[:1] == r[:1] for a, r in zip(answers, reference)]))
        entry = {"exact": exact, "first_token": first}
        values = {"answers.exact": exact, "answers.first_token": first}
        acc = accuracy(ctx.inputs, texts[combo])
        if acc is not None:
            entry["accuracy"] = acc
            entry["accuracy_drop"] = {"overall": ref_acc["overall"] - acc["overall"]}
            values["answers.accuracy_drop"] = ref_acc["overall"] - acc["overall"]
        figures["combinations"][combo] = entry
        gates += [ctx.gate(name, "answers", combo, value) for name, value in values.items()]
    ctx.samples = [{"question": q.question, **{who: texts[who][i] for who in texts}}
                   for i, (q, _) in enumerate(ctx.prompts[:N_SAMPLES])]
    return figures, gates


def answer_text(ctx: Context, ids: list[int]) -> str:
    """What a user is shown for these (visible) ids: decoded, cut at the template's first stop string."""
    stream = TextStream(ctx.template.stop)
    text = "".join(stream.push(ctx.candidate.backend.piece(t)) for t in ids) + stream.finish()
    return text.strip()


def accuracy(inputs: CheckInputs, texts: list[str]) -> dict | None:
    if not all(q.answer is not None for q in inputs.questions):
        return None
    right: dict[str, list[bool]] = {}
    for q, text in zip(inputs.questions, texts):
        right.setdefault(q.form or "all", []).append(inputs.score(text, q.answer))
    every = [x for v in right.values() for x in v]
    return {"overall": float(np.mean(every)), "per_form": {k: float(np.mean(v)) for k, v in right.items()}}


def perplexity(llm, tokenizer: PromptTokenizer, text: str, window: int = 512) -> float:
    tokens = tokenizer.llm.tokenize(text, add_bos=True)
    nll = []
    for start in range(0, max(1, len(tokens) - 1), window - 1):
        part = tokens[start:start + window]
        if len(part) > 1:
            nll.append(llm.token_nll(part))
    return float(np.exp(np.concatenate(nll).mean()))
