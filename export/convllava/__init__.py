"""ConvLLaVA checkpoints -> one vision graph per variant (tower, 5th stage, projector) and a Vicuna template.

The LLM's agreement with its unquantized self is measured here, on image prompts made with the
bundle's own default graph: the positions where a user meets the quantized model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ...prompt import VICUNA_V1, ImageSlot
from ..families import ExportFamily, ShippedVision, VisionResult

AGREEMENT_QUESTIONS = ("Describe the image.", "What is in the picture?", "How many objects are there?")
AGREEMENT_IMAGES = 3  # generated pictures (export/probe_images.py) whose rows the LLM sees at export
AGREEMENT_ANSWER_TOKENS = 24  # per answer: enough positions to see where 4 bits change a choice


class ConvLlavaExport(ExportFamily):
    name = "convllava"
    measures_agreement = True

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
    from ...families.convllava import ConvLlavaEncoder
    from ...preprocess import preprocess
    from ...quantize.accuracy import compare_logits, sequence_logits
    from ...tokenizer import PromptTokenizer
    from ..probe_images import probe_images

    shipped = next(g for g in vision.graphs if g.variant == options.vision_types[0])
    encoder = ConvLlavaEncoder.from_file(shipped.path, "cpu", options.threads)
    images = [encoder.encode(preprocess(im, vision.preprocess)) for im in probe_images(AGREEMENT_IMAGES, seed=3)]
    del encoder  # its memory before the LLMs'
    # One model at a time, both written by this export a moment ago (no trial load in a child): a 7B's F16
    # reference (13.5 GB) and its Q4 file together thrashed a 24 GB machine. The reference loads without
    # extra buffer types: their repacked (AMX) copy of F16 weights doubled its memory.
    ref = LlamaCppBackend(conversion.path, n_ctx=1024, threads=options.threads, kv_f32=True, trial=False,
                          extra_bufts=False)
    vocab = conversion.vocab
    tokenizer = PromptTokenizer(ref, vocab.runtime_entry())
    sequences, ref_logits = [], []
    for n, embeds in enumerate(images):
        slot = ImageSlot(f"probe{n}", len(embeds))
        for question in AGREEMENT_QUESTIONS:
            items = tokenizer.items(VICUNA_V1.render([(question, None)]), slot)
            answer, rows = _greedy_answer(ref, items, {slot.key: embeds})
            ref_logits.append(rows)
            sequences.append((list(items) + answer, {slot.key: embeds}, len(rows)))
    ref.close()
    cand = LlamaCppBackend(llm_path, n_ctx=1024, threads=options.threads, kv_f32=True, trial=False)
    cand_logits = [sequence_logits(cand, seq, embeds)[-n_rows:] for seq, embeds, n_rows in sequences]
    cand.close()
    agreement = compare_logits(ref_logits, cand_logits)
    return {**agreement.to_dict(),
            "measured_on": f"{agreement.n_positions} answer positions: the unquantized model's greedy answers to "
                           f"{len(AGREEMENT_QUESTIONS)} questions about {len(images)} generated images "
                           f"(image rows from the {shipped.variant} graph)"}


def _greedy_answer(backend, items, embeds: dict, max_tokens: int = AGREEMENT_ANSWER_TOKENS) -> tuple[list[int], np.ndarray]:
    """The model's own greedy continuation of ``items`` (stops at its end-of-generation token), and its
    logits at the last prompt position and after each answer token: [len(answer) + 1, n_vocab]."""
    from ...quantize.accuracy import sequence_logits

    rows = [sequence_logits(backend, items, embeds)[-1]]
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
