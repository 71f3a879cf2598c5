"""``convllava-edge check``: what each quantization costs, stage by stage, with gates for CI.

Stages (each against a reference that is never the thing measured):
- vision: every vision graph of the bundle against the fp32 reference (the bundle's own fp32 graph,
  a reference bundle's, or the PyTorch module of a reference checkpoint) on the same images: per-token
  cosine (mean, min) and relative L2 of the tower features and of the projected embeddings;
- llm: the bundle's GGUF against the reference LLM (a reference bundle's GGUF, or the checkpoint in
  transformers) on image-conditioned prompts, both fed the same reference image embeddings: KL of the
  next-token distributions (mean, 99th percentile), top-1 agreement, and perplexity on a text file;
  with a checkpoint, transformers + bitsandbytes NF4 (the official 4-bit option) is measured beside it;
- answers: greedy answers of each vision x LLM combination against the reference combination:
  exact and first-token agreement, and accuracy when the questions carry expected answers.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import shapes_task
from ..errors import ConfigError, ConvLlavaEdgeError
from ..image import image_files, open_image
from ..llm import LlamaCppBackend, SamplingOptions
from ..manifest import load_manifest, resolve_inside
from ..metrics import compare_embeddings
from ..pipeline import AskOptions, Decoder, PromptTokenizer, evaluate_items
from ..preprocess import PreprocessConfig, preprocess
from ..prompt import ImageSlot, Item, image_end, positions, template_from_dict
from ..vision import OnnxVisionEncoder
from .accuracy import compare_logits, log_softmax, sequence_logits

# Gate name -> (default threshold, higher is better). Vision gates apply to the projected embeddings
# (what the LLM receives). Defaults: the vision issue's int8 bar for cosine; a KL and top-1 budget a
# 4-bit LLM meets on trained models; answers may not lose more than 2 points of accuracy.
GATES: dict[str, tuple[float, bool]] = {
    "vision.cosine_mean": (0.99, True),
    "vision.cosine_min": (0.95, True),
    "vision.rel_l2": (0.15, False),
    "llm.kl_mean": (0.05, False),
    "llm.kl_p99": (0.5, False),
    "llm.top1": (0.90, True),
    "answers.first_token": (0.90, True),
    "answers.exact": (0.80, True),
    "answers.accuracy_drop": (0.02, False),
}
MAX_ANSWER_TOKENS = 32
N_DEFAULT_IMAGES = 20  # demo-task scenes when no images are given, 3 questions each: one changed answer
# of 60 moves accuracy by 1.7 points, inside the default accuracy_drop gate of 2 (with 8 scenes one flip failed it)


@dataclass(frozen=True)
class CheckQuestion:
    image: str  # key into the image table
    question: str
    answer: str | None = None
    form: str | None = None


@dataclass
class CheckInputs:
    images: dict[str, Any]  # name -> PIL image
    questions: list[CheckQuestion]
    text: str | None = None
    source: str = ""


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

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "reference": self.reference, "inputs": self.inputs, "vision": self.vision,
                "llm": self.llm, "answers": self.answers, "sizes": self.sizes, "passed": self.passed,
                "gates": [{"name": g.name, "stage": g.stage, "subject": g.subject, "value": g.value,
                           "threshold": g.threshold, "passed": g.passed} for g in self.gates]}


def parse_gates(specs: Sequence[str]) -> dict[str, float]:
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


# -- inputs -------------------------------------------------------------------------------------
def default_inputs(n_images: int = N_DEFAULT_IMAGES, seed: int = 2024) -> CheckInputs:
    """The demo task: rendered scenes with three questions each, expected answers included."""
    rng = np.random.default_rng(seed)
    images, questions = {}, []
    for i in range(n_images):
        scene = shapes_task.random_scene(rng)
        name = f"scene{i}"
        images[name] = scene.render()
        qs = shapes_task.questions_for(scene, rng)
        for j in rng.choice(len(qs), size=min(3, len(qs)), replace=False):
            q = qs[int(j)]
            questions.append(CheckQuestion(name, q.text, q.answer, q.form))
    return CheckInputs(images, questions, source=f"demo task, seed {seed}")


def load_inputs(images_dir: Path | None, questions_file: Path | None, text_file: Path | None) -> CheckInputs:
    if images_dir is None and questions_file is None:
        inputs = default_inputs()
    else:
        images: dict[str, Any] = {}
        questions: list[CheckQuestion] = []
        if questions_file is not None:
            questions, images = _read_questions(questions_file)
        if images_dir is not None:
            for path in image_files(images_dir):
                images.setdefault(path.name, open_image(path))
        if not questions:  # images only: ask the same generic questions of each
            questions = [CheckQuestion(name, q) for name in images
                         for q in ("Describe the image.", "What is in the picture?")]
        inputs = CheckInputs(images, questions, source=str(questions_file or images_dir))
    if text_file is not None:
        try:
            inputs.text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{text_file}: cannot read text ({e})") from e
    return inputs


def _read_questions(path: Path) -> tuple[list[CheckQuestion], dict[str, Any]]:
    questions, images = [], {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question = str(row["image"]), str(row["question"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{n}: expected {{\"image\": ..., \"question\": ..., \"answer\": ...}}") from e
        image_path = (Path(path).parent / image) if not Path(image).is_absolute() else Path(image)
        if image not in images:
            images[image] = open_image(image_path)
        answer = row.get("answer")
        questions.append(CheckQuestion(image, question, None if answer is None else str(answer), row.get("form")))
    if not questions:
        raise ConfigError(f"{path}: no questions")
    return questions, images


# -- LLM sources ----------------------------------------------------------------------------------
class GgufLlm:
    """A GGUF in llama.cpp (F32 KV cache: the measurement should not include KV rounding)."""

    def __init__(self, name: str, path: Path, threads: int | None):
        self.name, self.path = name, path
        self.backend = LlamaCppBackend(path, n_ctx=2048, threads=threads, kv_f32=True)

    def logits(self, items: list[Item], embeds: dict[str, np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        if rows is None:
            return sequence_logits(self.backend, items, embeds)
        self.backend.truncate(0)  # LLaVA-Mini: the whole prompt as rows; the text after the image is measured
        return self.backend.eval_embeddings(rows, all_logits=True)[_after_image(items):]

    def answer(self, items: list[Item], embeds: dict[str, np.ndarray], stops: Sequence[str],
               rows: np.ndarray | None = None) -> list[int]:
        self.backend.truncate(0)
        if rows is None:
            evaluate_items(self.backend, items, embeds)
        else:
            self.backend.eval_embeddings(rows)
        decoder = Decoder(self.backend, AskOptions(MAX_ANSWER_TOKENS, SamplingOptions(temperature=0.0)), stops)
        for _ in decoder.run():
            pass
        return decoder.tokens

    def token_nll(self, tokens: list[int]) -> np.ndarray:
        self.backend.truncate(0)
        logits = self.backend.eval_tokens(tokens[:-1], all_logits=True)
        lp = log_softmax(logits)
        return -lp[np.arange(len(tokens) - 1), tokens[1:]]

    def close(self) -> None:
        self.backend.close()


def _after_image(items: Sequence[Item]) -> int:
    """KV position right after the (first) image slot."""
    return positions(items[:image_end(items)])


class TorchLlm:
    """The checkpoint's Llama in transformers (fp32, or bf16 when fp32 would not fit), optionally NF4."""

    def __init__(self, name: str, checkpoint: Path, nf4: bool = False, is_end: Callable[[int], bool] = lambda t: False,
                 piece: Callable[[int], bytes] = lambda t: b""):
        import torch

        from ..export.checkpoint import TensorStore
        from ..export.config import LlavaConfig

        self.name, self._torch, self._is_end, self._piece = name, torch, is_end, piece
        llava = LlavaConfig.load(checkpoint)
        store = TensorStore(checkpoint)
        keys = [k for k in store.keys() if not k.startswith(("model.vision_tower.", "model.mm_projector."))]
        n_params = sum(math.prod(store.info(k).shape) for k in keys)
        dtype = torch.float32 if n_params * 4 < _available_memory() * 0.5 else torch.bfloat16
        self.dtype = str(dtype).removeprefix("torch.")
        config = _llama_config(llava.llm)
        if nf4:
            self.model = _load_nf4(config, store, keys)
            self.dtype = "nf4 (bitsandbytes, double quant; fp32 compute)"
        else:
            from transformers import LlamaForCausalLM

            self.model = LlamaForCausalLM(config).to(dtype).eval()
            self.model.load_state_dict({k: store.get(k).to(dtype) for k in keys}, strict=True)

    def _inputs(self, items: list[Item], embeds: dict[str, np.ndarray], rows: np.ndarray | None = None):
        """[positions, d]: token embeddings with the image rows spliced in (inputs_embeds), or ``rows`` as given."""
        torch = self._torch
        table = self.model.get_input_embeddings()
        if rows is not None:
            return torch.from_numpy(np.ascontiguousarray(rows)).to(table.weight.dtype)
        rows = [torch.from_numpy(embeds[item.key]).to(table.weight.dtype) if isinstance(item, ImageSlot)
                else table(torch.tensor([item])) for item in items]
        return torch.cat(rows)

    def logits(self, items: list[Item], embeds: dict[str, np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        """Logits from right after the image on; ``rows`` (LLaVA-Mini's pre-fused prompt) replaces the items."""
        torch = self._torch
        with torch.no_grad():
            out = self.model(inputs_embeds=self._inputs(items, embeds, rows)[None]).logits[0].float().numpy()
        return out[_after_image(items):]

    def answer(self, items: list[Item], embeds: dict[str, np.ndarray], stops: Sequence[str],
               rows: np.ndarray | None = None) -> list[int]:
        torch = self._torch
        from ..llm import TextStream

        table = self.model.get_input_embeddings()
        stream, tokens, past = TextStream(stops), [], None
        inputs = self._inputs(items, embeds, rows)[None]
        with torch.no_grad():
            for _ in range(MAX_ANSWER_TOKENS):
                out = self.model(inputs_embeds=inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                if self._is_end(token):
                    break
                tokens.append(token)
                stream.push(self._piece(token))
                if stream.stopped:
                    break
                inputs = table(torch.tensor([[token]]))
        return tokens

    def token_nll(self, tokens: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            logits = self.model(torch.tensor([tokens[:-1]])).logits[0].float().numpy()
        lp = log_softmax(logits)
        return -lp[np.arange(len(tokens) - 1), tokens[1:]]

    def close(self) -> None:
        self.model = None


def _available_memory() -> int:
    try:
        return int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return 8 << 30


def _llama_config(llm):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                       num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
                       num_key_value_heads=llm.num_key_value_heads, vocab_size=llm.vocab_size,
                       max_position_embeddings=llm.max_position_embeddings, rms_norm_eps=llm.rms_norm_eps,
                       rope_theta=llm.rope_theta, tie_word_embeddings=llm.tie_word_embeddings, head_dim=llm.head_dim)


def _load_nf4(config, store, keys):
    """transformers' own 4-bit path (what the official loader's --load-4bit does): NF4 + double quant."""
    import torch
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("the NF4 baseline needs bitsandbytes and accelerate (pip install 'convllava-edge[nf4]')") from e
    with tempfile.TemporaryDirectory(prefix="convllava-nf4-") as tmp:
        config.save_pretrained(tmp)
        save_file({k: store.get(k).to(torch.float32).contiguous() for k in keys}, str(Path(tmp) / "model.safetensors"))
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        return LlamaForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map="cpu",
                                                dtype=torch.float32).eval()


# -- the check --------------------------------------------------------------------------------------
class Reference:
    """Where the fp32 vision and the unquantized LLM come from."""

    def __init__(self, path: Path | None, threads: int | None, vision_tower: Path | None = None):
        self.path, self.threads, self.vision_tower = path, threads, vision_tower
        self.kind = "self" if path is None else ("bundle" if (Path(path) / "manifest.json").is_file() else "checkpoint")
        self.manifest = load_manifest(path) if self.kind == "bundle" else None
        self._torch_vision = None

    def vision_encoder(self, bundle: Path, manifest) -> tuple[str, Any]:
        """(description, encoder with encode_both) for the fp32 reference graph(s)."""
        if manifest.family == "llava-mini":
            return self._mini_encoder(bundle, manifest)
        if self.kind == "checkpoint":
            from ..export.vision_model import load_vision_model, open_vision_checkpoint

            tower = self.vision_tower or recorded_tower(manifest)
            model = load_vision_model(open_vision_checkpoint(self.path, tower))
            return f"PyTorch fp32 ({self.path}{f', tower {tower}' if tower else ''})", _TorchVision(model)
        source_bundle, source = (self.path, self.manifest) if self.kind == "bundle" else (bundle, manifest)
        fp32 = next((v for v in source.vision if v.variant == "fp32"), None)
        if fp32 is None:
            raise ConfigError(f"{source_bundle}: no fp32 vision graph to compare against "
                              "(export one with --vision-type fp32, or pass --reference CHECKPOINT)")
        return f"fp32 graph of {source_bundle}", OnnxVisionEncoder(resolve_inside(source_bundle, fp32.graph), "cpu",
                                                                  self.threads)

    def _mini_encoder(self, bundle: Path, manifest) -> tuple[str, Any]:
        from ..mini import MiniEncoder

        if self.kind == "checkpoint":
            raise ConfigError("--reference CHECKPOINT is not supported for LLaVA-Mini bundles: pass a bundle "
                              "exported with --vision-type fp32 and --llm-type F16 or F32")
        source_bundle, source = (self.path, self.manifest) if self.kind == "bundle" else (bundle, manifest)
        fp32 = next((v for v in source.vision if v.variant == "fp32"), None)
        if fp32 is None:
            raise ConfigError(f"{source_bundle}: no fp32 vision graphs to compare against (export with "
                              "--vision-type fp32)")
        parts = {role: resolve_inside(source_bundle, f) for role, f in fp32.parts.items()}
        return f"fp32 graphs of {source_bundle}", MiniEncoder(parts, "cpu", self.threads)

    def llm(self, piece, is_end) -> Any | None:
        if self.kind == "bundle":
            if self.manifest.llm is None:
                return None
            return GgufLlm(f"{self.manifest.llm.type} ({self.path})", resolve_inside(self.path, self.manifest.llm.file),
                           self.threads)
        if self.kind == "checkpoint":
            return TorchLlm("transformers (checkpoint)", self.path, is_end=is_end, piece=piece)
        return None


def recorded_tower(manifest) -> Path | None:
    """The tower folder the bundle was exported from (``--vision-tower``), when it still exists here."""
    path = manifest.source.get("vision_tower")
    if not isinstance(path, str):  # bundles from before it was recorded: the export's note names it
        note = next((n for n in manifest.source.get("notes", []) if isinstance(n, str)
                     and n.startswith(TOWER_NOTE)), None)
        path = note[len(TOWER_NOTE):] if note else None
    return Path(path) if path and Path(path).is_dir() else None


TOWER_NOTE = "vision tower from --vision-tower "  # export/vision_model.py's note


class _TorchVision:
    def __init__(self, model):
        import torch

        self.model, self._torch = model, torch

    def encode_both(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.no_grad():
            features, embeds = self.model.features_and_embeds(self._torch.from_numpy(pixels))
        return features.numpy()[0], embeds.numpy()[0]


def run_check(bundle: Path, inputs: CheckInputs, reference_path: Path | None = None, gates: dict[str, float] | None = None,
              threads: int | None = None, nf4: bool = True, progress: Callable[[str, int, int], None] = lambda *a: None,
              vision_tower: Path | None = None) -> CheckResult:
    """``vision_tower``: the tower folder of a checkpoint reference (default: the one the bundle was
    exported from, when it is still there; else the copy in the checkpoint's shards)."""
    gates = gates if gates is not None else parse_gates([])
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    if manifest.llm is None or manifest.template is None:
        raise ConfigError(f"{bundle}: bundle has no LLM")
    if vision_tower is not None and (reference_path is None or (Path(reference_path) / "manifest.json").is_file()):
        raise ConfigError("--vision-tower goes with --reference CHECKPOINT (a bundle's graphs already hold a tower)")
    reference = Reference(reference_path, threads, vision_tower)
    config = PreprocessConfig.from_manifest(manifest.preprocess)
    result = CheckResult(bundle=str(bundle), reference={"kind": reference.kind, "path": str(reference_path or bundle)},
                         inputs={"source": inputs.source, "n_images": len(inputs.images),
                                 "n_questions": len(inputs.questions), "text": inputs.text is not None})
    sizes = {f.path: f.size for f in manifest.files}
    pixels = {name: preprocess(image, config, manifest.preprocess.get("aspect", "pad"))
              for name, image in inputs.images.items()}

    # vision -------------------------------------------------------------------------------------
    ref_name, ref_encoder = reference.vision_encoder(bundle, manifest)
    ref_out = {}
    for i, (name, p) in enumerate(pixels.items()):
        progress("vision: reference", i, len(pixels))
        ref_out[name] = ref_encoder.encode_both(p)
    ref_embeds = {name: embeds for name, (_, embeds) in ref_out.items()}
    result.vision = {"reference": ref_name, "variants": {}}
    encoders = {}
    mini = manifest.family == "llava-mini"
    for entry in manifest.vision:
        is_ref = reference.kind == "self" and entry.variant == "fp32"
        if mini:
            from ..mini import MiniEncoder

            encoders[entry.variant] = MiniEncoder({r: resolve_inside(bundle, f) for r, f in entry.parts.items()},
                                                  "cpu", threads)
        else:
            encoders[entry.variant] = OnnxVisionEncoder(resolve_inside(bundle, entry.graph), "cpu", threads)
        result.sizes[f"vision {entry.variant}"] = sum(sizes[f] for f in entry.files)
        if is_ref:
            continue
        outs = []
        for i, (name, p) in enumerate(pixels.items()):
            progress(f"vision: {entry.variant}", i, len(pixels))
            outs.append((name, encoders[entry.variant].encode_both(p)))
        feats = compare_embeddings([o[0] for _, o in outs], [ref_out[n][0] for n, _ in outs])
        embeds = compare_embeddings([o[1] for _, o in outs], [ref_out[n][1] for n, _ in outs])
        result.vision["variants"][entry.variant] = {"features": feats.to_dict(), "embeds": embeds.to_dict()}
        for figure in ("cosine_mean", "cosine_min", "rel_l2"):
            name = f"vision.{figure}"
            result.gates.append(GateResult(name, "vision", entry.variant, getattr(embeds, figure), gates[name],
                                           GATES[name][1]))

    # LLM ----------------------------------------------------------------------------------------
    template = template_from_dict(manifest.template)
    candidate = GgufLlm(manifest.llm.type, resolve_inside(bundle, manifest.llm.file), threads)
    result.sizes[f"LLM {manifest.llm.type}"] = sizes[manifest.llm.file]
    tokenizer = PromptTokenizer(candidate.backend, manifest.tokenizer)
    prompts = []
    slot_size = (lambda e: int(manifest.tokens_per_image["compressed"])) if mini else len
    for q in inputs.questions:
        slot = ImageSlot(f"img:{q.image}", slot_size(ref_embeds[q.image]))
        prompts.append((q, tokenizer.items(template.render([(q.question, None)]), slot)))
    embeds_by_key = {f"img:{name}": e for name, e in ref_embeds.items()}

    def rows_with(encoder, vision_by_key) -> list[np.ndarray | None]:
        """LLaVA-Mini: each prompt's LLM input rows, pre-fused by ``encoder``; ConvLLaVA: none (tokens + image)."""
        if not mini:
            return [None] * len(prompts)
        from ..mini import prompt_rows

        return [prompt_rows(encoder, items, vision_by_key) for _, items in prompts]

    ref_rows = rows_with(ref_encoder, embeds_by_key)
    ref_llm = reference.llm(candidate.backend.piece, candidate.backend.is_end)
    llms: dict[str, Any] = {manifest.llm.type: candidate}
    if ref_llm is not None and nf4 and reference.kind == "checkpoint" and not mini:
        try:
            llms["bnb-nf4"] = TorchLlm("bitsandbytes NF4", reference_path, nf4=True, is_end=candidate.backend.is_end,
                                       piece=candidate.backend.piece)
        except (ConfigError, ImportError, RuntimeError) as e:
            result.llm["nf4_skipped"] = str(e).splitlines()[0]
    if ref_llm is None:
        result.llm = {"reference": None, "note": "no LLM reference: pass --reference BUNDLE (F16/F32) or CHECKPOINT",
                      "export_time": manifest.accuracy.get("llm_vs_unquantized"), "variants": {}}
    else:
        result.llm.update({"reference": ref_llm.name, "variants": {}})
        ref_logits = []
        for i, (_, items) in enumerate(prompts):
            progress("llm: reference", i, len(prompts))
            ref_logits.append(ref_llm.logits(items, embeds_by_key, ref_rows[i]))
        ref_ppl = _perplexity(ref_llm, tokenizer, inputs.text) if inputs.text else None
        for name, llm in llms.items():
            cand_logits = []
            for i, (_, items) in enumerate(prompts):
                progress(f"llm: {name}", i, len(prompts))
                cand_logits.append(llm.logits(items, embeds_by_key, ref_rows[i]))
            agreement = compare_logits(ref_logits, cand_logits).to_dict()
            if inputs.text:
                ppl = _perplexity(llm, tokenizer, inputs.text)
                agreement.update({"perplexity": ppl, "perplexity_reference": ref_ppl,
                                  "perplexity_change": ppl / ref_ppl - 1})
            result.llm["variants"][name] = agreement
            for figure in ("kl_mean", "kl_p99", "top1"):
                gname = f"llm.{figure}"
                result.gates.append(GateResult(gname, "llm", name, agreement[figure], gates[gname], GATES[gname][1]))

    # answers ------------------------------------------------------------------------------------
    answer_llm_ref = ref_llm if ref_llm is not None else candidate
    combos: dict[str, tuple[dict[str, np.ndarray], Any, list]] = {}
    for variant, enc in encoders.items():
        embeds = {f"img:{n}": enc.encode(p) for n, p in pixels.items()}
        combos[f"{variant} + {manifest.llm.type}"] = (embeds, candidate, rows_with(enc, embeds))
    if "bnb-nf4" in llms:
        combos["fp32 + bnb-nf4"] = (embeds_by_key, llms["bnb-nf4"], ref_rows)
    reference_answers = []
    for i, (q, items) in enumerate(prompts):
        progress("answers: reference", i, len(prompts))
        reference_answers.append(answer_llm_ref.answer(items, embeds_by_key, template.stop, ref_rows[i]))
    ref_acc = _accuracy(inputs.questions, reference_answers, candidate.backend)
    result.answers = {"reference": f"{ref_name} + {answer_llm_ref.name}", "reference_accuracy": ref_acc,
                      "combinations": {}}
    if reference.kind == "bundle":
        ref_sizes = {f.path: f.size for f in reference.manifest.files}
        fp32 = next((v for v in reference.manifest.vision if v.variant == "fp32"), None)
        result.reference["size"] = sum(ref_sizes[f] for f in fp32.files) + \
            (ref_sizes[reference.manifest.llm.file] if reference.manifest.llm else 0)
    for combo, (embeds, llm, rows) in combos.items():
        answers = []
        for i, (q, items) in enumerate(prompts):
            progress(f"answers: {combo}", i, len(prompts))
            answers.append(llm.answer(items, embeds, template.stop, rows[i]))
        exact = float(np.mean([a == r for a, r in zip(answers, reference_answers)]))
        first = float(np.mean([a[:1] == r[:1] for a, r in zip(answers, reference_answers)]))
        entry = {"exact": exact, "first_token": first}
        acc = _accuracy(inputs.questions, answers, candidate.backend)
        if acc is not None:
            entry["accuracy"] = acc
            entry["accuracy_drop"] = {"overall": ref_acc["overall"] - acc["overall"]}
        result.answers["combinations"][combo] = entry
        figures = {"answers.exact": exact, "answers.first_token": first}
        if acc is not None:
            figures["answers.accuracy_drop"] = ref_acc["overall"] - acc["overall"]
        for gname, value in figures.items():
            result.gates.append(GateResult(gname, "answers", combo, value, gates[gname], GATES[gname][1]))
    for llm in {id(v): v for v in [*llms.values(), ref_llm] if v is not None}.values():
        llm.close()
    return result


def _perplexity(llm, tokenizer: PromptTokenizer, text: str, window: int = 512) -> float:
    tokens = tokenizer.llm.tokenize(text, add_bos=True)
    nll = []
    for start in range(0, max(1, len(tokens) - 1), window - 1):
        part = tokens[start:start + window]
        if len(part) > 1:
            nll.append(llm.token_nll(part))
    return float(np.exp(np.concatenate(nll).mean()))


def _accuracy(questions: Sequence[CheckQuestion], answers: Sequence[list[int]], backend) -> dict | None:
    if not all(q.answer is not None for q in questions):
        return None
    right: dict[str, list[bool]] = {}
    for q, ids in zip(questions, answers):
        text = backend.detokenize(ids).split("</s>")[0]
        right.setdefault(q.form or "all", []).append(shapes_task.is_correct(text, q.answer))
    every = [x for v in right.values() for x in v]
    return {"overall": float(np.mean(every)), "per_form": {k: float(np.mean(v)) for k, v in right.items()}}


# -- report -----------------------------------------------------------------------------------------
def write_report(result: CheckResult, folder: Path) -> tuple[Path, Path]:
    """report.md (every figure and gate) and chart.png (size against accuracy per variant)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConvLlavaEdgeError("--report needs matplotlib (pip install 'convllava-edge[report]')") from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = [f"# convllava-edge check: {Path(result.bundle).name}", "",
          f"Reference: {result.reference['kind']} `{result.reference['path']}`; inputs: {result.inputs['source']} "
          f"({result.inputs['n_images']} images, {result.inputs['n_questions']} questions).", "",
          f"**{'PASSED' if result.passed else 'FAILED'}**", "", "## Vision", "",
          f"Reference: {result.vision.get('reference')}", "",
          "| variant | size | features cos mean | features cos min | embeds cos mean | embeds cos min | embeds rel L2 |",
          "|---|---|---|---|---|---|---|"]
    for v, figs in result.vision.get("variants", {}).items():
        f, e = figs["features"], figs["embeds"]
        md.append(f"| {v} | {result.sizes.get('vision ' + v, 0) / 1e6:.1f} MB | {f['cosine_mean']:.5f} | "
                  f"{f['cosine_min']:.5f} | {e['cosine_mean']:.5f} | {e['cosine_min']:.5f} | {e['rel_l2']:.2e} |")
    md += ["", "## LLM", "", f"Reference: {result.llm.get('reference')}", "",
           "| variant | KL mean | KL p99 | top-1 | perplexity change |", "|---|---|---|---|---|"]
    for v, a in result.llm.get("variants", {}).items():
        ppl = f"{a['perplexity_change']:+.2%}" if "perplexity_change" in a else "-"
        md.append(f"| {v} | {a['kl_mean']:.4f} | {a['kl_p99']:.4f} | {a['top1']:.3f} | {ppl} |")
    if result.llm.get("note"):
        md.append(f"\n{result.llm['note']}")
    md += ["", "## Answers", "", f"Reference: {result.answers.get('reference')}", "",
           "| combination | exact | first token | accuracy |", "|---|---|---|---|"]
    for c, a in result.answers.get("combinations", {}).items():
        acc = f"{a['accuracy']['overall']:.3f}" if "accuracy" in a else "-"
        md.append(f"| {c} | {a['exact']:.3f} | {a['first_token']:.3f} | {acc} |")
    md += ["", "## Gates", "", "| gate | stage | subject | value | threshold | result |", "|---|---|---|---|---|---|"]
    for g in result.gates:
        md.append(f"| {g.name} | {g.stage} | {g.subject} | {g.value:.4g} | {g.threshold:g} | "
                  f"{'pass' if g.passed else '**FAIL**'} |")
    report = folder / "report.md"
    report.write_text("\n".join(md) + "\n", encoding="utf-8")

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    points = []
    llm_size = next((s for k, s in result.sizes.items() if k.startswith("LLM")), 0)
    for combo, a in result.answers.get("combinations", {}).items():
        vision = combo.split(" + ")[0]
        size = (result.sizes.get(f"vision {vision}", 0) + llm_size) / 1e6
        score = a["accuracy"]["overall"] if "accuracy" in a else a["exact"]
        points.append((size, score, combo))
    ref_acc = result.answers.get("reference_accuracy")
    if "size" in result.reference:
        points.append((result.reference["size"] / 1e6, ref_acc["overall"] if ref_acc else 1.0, "reference"))
    for size, score, label in points:
        ax.scatter([size], [score], marker="s" if label == "reference" else "o")
        ax.annotate(label, (size, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bundle size, MB (vision graph + LLM)")
    ax.set_ylabel("answer accuracy" if points and "accuracy" in next(iter(result.answers["combinations"].values()))
                  else "answers equal to the reference")
    ax.set_title("size against accuracy per variant")
    ax.grid(alpha=0.3)
    chart = folder / "chart.png"
    fig.tight_layout()
    fig.savefig(chart, format="png")
    plt.close(fig)
    return report, chart
