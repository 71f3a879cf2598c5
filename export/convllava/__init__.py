"""ConvLLaVA checkpoints -> one vision graph per variant (tower, 5th stage, projector) and a Vicuna template.

The LLM's agreement with its unquantized self is measured here, on image prompts made with the
bundle's own default graph: the positions where a user meets the quantized model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ...kv_cache import evaluate_items
from ...prompt import VICUNA_V1, ImageSlot, image_end, positions
from ..families import ExportFamily, ShippedVision, VisionResult

AGREEMENT_QUESTIONS = ("Describe the image.", "What is in the picture?", "How many objects are there?")
AGREEMENT_IMAGES = 3  # generated pictures (export/probe_images.py) whose rows the LLM sees at export
AGREEMENT_ANSWER_TOKENS = 24  # per answer: enough positions to see where 4 bits change a choice


class ConvLlavaExport(ExportFamily):
    name = "convllava"
    measures_agreement = True
    vision_in_child = True

    @property
    def model_types(self):
        from ..config import CONVLLAVA_MODEL_TYPES

        return CONVLLAVA_MODEL_TYPES

    def open(self, checkpoint: Path, vision_tower: Path | None, options):
        from .vision_model import open_vision_checkpoint

        return open_vision_checkpoint(checkpoint, vision_tower)

    def export_vision(self, ckpt, folder: Path, options, progress) -> VisionResult:
        from .vision_export import export_vision

        vision = export_vision(ckpt, folder, options.vision_types, options.calibration_images, progress.stage,
                               options.threads)
        order = {v: i for i, v in enumerate(options.vision_types)}
        shipped = [ShippedVision(g.variant, g.files, g.method, g.lint.passed, g.accuracy.to_dict() if g.accuracy else None)
                   for g in sorted(vision.graphs, key=lambda g: order.get(g.variant, len(order)))
                   if g.variant in options.vision_types]
        kept = {f for v in shipped for f in v.files}  # bf16 ships the fp32 graph's files
        unshipped = [f for g in vision.graphs if g.variant not in options.vision_types for f in g.files if f not in kept]
        h, w = vision.preprocess.crop_size
        fp32 = next(g for g in vision.graphs if g.variant == "fp32")
        return VisionResult(
            vision=shipped, unshipped=unshipped, preprocess=replace(vision.preprocess, aspect="pad"),
            n_embd=vision.n_embd,
            tokens_per_image={"stride": vision.stride, "rule": f"(H / {vision.stride}) * (W / {vision.stride})",
                              "square": (h // vision.stride) * (w // vision.stride)},
            tower=vision.tower, template=VICUNA_V1,
            accuracy={"vision_fp32_vs_pytorch": {f"{r.height}x{r.width}": r.rel_error for r in fp32.validation},
                      "vision_fp32_tolerance": fp32.validation[0].tolerance if fp32.validation else None},
            notes=vision.notes, state=vision)

    def llm_config(self, checkpoint: Path):
        from ..config import LlavaConfig
        from ..gguf_convert import NOT_LLM_PREFIXES

        llava = LlavaConfig.load(checkpoint)
        return llava.llm, llava.mm.max_length, NOT_LLM_PREFIXES

    def llm_agreement(self, vision: VisionResult, llm_path: Path, conversion, options) -> dict | None:
        return _llm_agreement(vision.state, llm_path, conversion, options)

    def torch_vision_reference(self, checkpoint: Path, tower: Path | None, manifest=None):
        from .vision_model import load_vision_model, open_vision_checkpoint

        tower = tower or (recorded_tower(manifest) if manifest is not None else None)
        model = load_vision_model(open_vision_checkpoint(checkpoint, tower))
        return f"PyTorch fp32 ({checkpoint}{f', tower {tower}' if tower else ''})", TorchVision(model)


class TorchVision:
    """The PyTorch vision module with the encoder's encode_both (``check``'s checkpoint reference)."""

    def __init__(self, model):
        import torch

        self.model, self._torch = model, torch

    def encode_both(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.no_grad():
            features, embeds = self.model.features_and_embeds(self._torch.from_numpy(pixels))
        return features.numpy()[0], embeds.numpy()[0]

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.encode_both(pixels)[1]


def recorded_tower(manifest) -> Path | None:
    """The tower folder the bundle was exported from (``--vision-tower``), when it still exists here."""
    path = manifest.source.get("vision_tower")  # what export records (bundle.py)
    return Path(path) if isinstance(path, str) and path and Path(path).is_dir() else None


def _llm_agreement(vision, llm_path: Path, conversion, options) -> dict:
    """Quantized vs unquantized GGUF where a user meets it: the distributions answers are drawn from.

    Rows as at run time: image rows from the bundle's own default vision graph on a few generated
    images, the template's text tokenized as the runtime does, then the unquantized model's own greedy
    answer. KL and top-1 are taken at the answer's positions only (the last prompt position and each
    answer token): the positions inside the system prompt and the question are never sampled from,
    and a small model's guesses there (what word comes next in a question) are noise that rounding
    flips freely (the demo measured KL p99 19.8 there, 0.59 on its answers through `check`).
    """
    from ...backends.llm_llamacpp import LlamaCppBackend
    from ...quantize.accuracy import compare_logits
    from ...tokenizer import PromptTokenizer
    from ..bundle import SilentProgress
    from ..isolated import ISOLATE_BYTES, run_isolated

    shipped = next(g for g in vision.graphs if g.variant == options.vision_types[0])
    # The image rows in a process of its own (export/isolated.py): ONNX Runtime's arenas for a 1536 px image are
    # gigabytes that stay with the process that ran them, and the LLMs come next.
    args = (shipped.path, vision.preprocess, options.threads)
    images = run_isolated(_probe_rows, args, SilentProgress(), "probe image encode") \
        if sum(f.stat().st_size for f in shipped.files) >= ISOLATE_BYTES else _probe_rows(*args, SilentProgress())
    # One model at a time, both written by this export a moment ago (no trial load in a child): a 7B's F16
    # reference (13.5 GB) and its Q4 file together thrashed a 24 GB machine. The reference loads without
    # extra buffer types: their repacked (AMX) copy of F16 weights doubled its memory.
    ref = LlamaCppBackend(conversion.path, n_ctx=1024, threads=options.threads, kv_f32=True, trial=False,
                          extra_bufts=False)
    vocab = conversion.vocab
    tokenizer = PromptTokenizer(ref, vocab.runtime_entry())
    per_image = []  # (the image's rows, its prompts): the questions share the system prompt and the image
    for n, embeds in enumerate(images):
        slot = ImageSlot(f"probe{n}", len(embeds))
        per_image.append(({slot.key: embeds}, [tokenizer.items(VICUNA_V1.render([(q, None)]), slot)
                                                for q in AGREEMENT_QUESTIONS]))
    sequences, ref_logits = [], []  # per image: [(prompt + answer, answer rows)]
    for embeds, prompts in per_image:
        answers = []
        for text in _after_shared_image(ref, prompts, embeds):
            answer, rows = _greedy_answer(ref, text)
            ref_logits.append(rows)
            answers.append((text + answer, len(rows)))
        sequences.append((embeds, prompts, answers))
    ref.close()
    cand = LlamaCppBackend(llm_path, n_ctx=1024, threads=options.threads, kv_f32=True, trial=False)
    cand_logits = []
    for embeds, prompts, answers in sequences:
        for (text, n_rows), _ in zip(answers, _after_shared_image(cand, prompts, embeds)):
            cand_logits.append(cand.eval_tokens(text, all_logits=True)[-n_rows:])
    cand.close()
    agreement = compare_logits(ref_logits, cand_logits)
    return {**agreement.to_dict(),
            "measured_on": f"{agreement.n_positions} answer positions: the unquantized model's greedy answers to "
                           f"{len(AGREEMENT_QUESTIONS)} questions about {len(images)} generated images "
                           f"(image rows from the {shipped.variant} graph)"}


def _probe_rows(graph: Path, config, threads: int | None, progress) -> list[np.ndarray]:
    """The projected rows of the agreement's generated images, from the bundle's default graph."""
    from ...families.convllava import ConvLlavaEncoder
    from ...preprocess import preprocess
    from ..probe_images import probe_images

    encoder = ConvLlavaEncoder.from_file(graph, "cpu", threads)
    return [encoder.encode(preprocess(im, config)) for im in probe_images(AGREEMENT_IMAGES, seed=3)]


def _after_shared_image(backend, prompts: list[list], embeds: dict):
    """For each prompt, its text after the image (a list of token ids), the KV cache holding the system prompt and
    the image before it: those are evaluated once for all the prompts (a 7B's prefill of ~600 positions is most
    of a reference answer's time). The text after the image is evaluated in one run either way, as
    quantize.accuracy.sequence_logits evaluates it, so every logit is the one a prompt evaluated from position 0
    gets (tests/e2e/test_e2e.py compares the two)."""
    cut = image_end(prompts[0])
    shared = prompts[0][:cut]
    backend.truncate(0)
    evaluate_items(backend, shared, embeds)
    n_shared = positions(shared)
    for items in prompts:
        text = list(items[cut:])
        if items[:cut] != shared or any(isinstance(t, ImageSlot) for t in text):
            raise AssertionError("the agreement's prompts share their text up to the image, and have one image")
        backend.truncate(n_shared)
        yield text


def _greedy_answer(backend, text: list[int], max_tokens: int = AGREEMENT_ANSWER_TOKENS) -> tuple[list[int], np.ndarray]:
    """The model's own greedy continuation of ``text`` (evaluated after what the KV cache holds; stops at its
    end-of-generation token), and its logits at the last prompt position and after each answer token:
    [len(answer) + 1, n_vocab]."""
    rows = [backend.eval_tokens(text, all_logits=True)[-1]]  # all rows, as sequence_logits asks for them
    answer: list[int] = []
    while len(answer) < max_tokens:
        token = int(np.argmax(rows[-1]))
        if backend.is_end(token):
            break
        answer.append(token)
        backend.eval_tokens([token])
        rows.append(backend.last_logits())
    return answer, np.stack(rows)


FAMILY = ConvLlavaExport()
