"""The reference pipeline, built from transformers the way the official ConvLLaVA code runs.

Nothing here uses convllava_edge's runtime: images go through llava's expand2square and
transformers' PIL CLIPImageProcessor, the tower is transformers' ConvNextModel (``hidden_states[-1]``
flattened row-major), the projector an ``nn.Sequential`` filled from the shards, prompts are rendered
and tokenized as llava/conversation.py and mm_utils.tokenizer_image_token do (transformers'
LlamaTokenizer, honouring the checkpoint's tokenizer_config), and LlamaForCausalLM is fed
``inputs_embeds`` with the image features spliced in, decoding greedily.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import ConvNextModel, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_TOKEN_INDEX = -200  # llava/constants.py
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def official_expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def shard_tensors(folder: Path, keep) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        tensors.update({k: v for k, v in part.items() if keep(k)})
    return tensors


class VisionReference(torch.nn.Module):
    def __init__(self, tower_dir: Path, checkpoint: Path):
        super().__init__()
        self.processor = CLIPImageProcessorPil.from_pretrained(str(tower_dir))
        self.tower = ConvNextModel.from_pretrained(str(tower_dir), dtype=torch.float32).eval()
        projector = shard_tensors(checkpoint, lambda k: k.startswith("model.mm_projector."))
        d_out, d_in = projector["model.mm_projector.0.weight"].shape
        self.proj = torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out))
        self.proj.load_state_dict({k.removeprefix("model.mm_projector."): v.float() for k, v in projector.items()})

    def pixels(self, image: Image.Image) -> np.ndarray:
        rgb = convert_to_rgb(image, return_numpy=False) if image.mode != "RGB" else image
        square = official_expand2square(rgb, tuple(int(x * 255) for x in self.processor.image_mean))
        return self.processor(square, return_tensors="np")["pixel_values"]

    @torch.no_grad()
    def forward(self, pixels: np.ndarray) -> np.ndarray:
        feats = self.tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1]
        feats = feats.permute(0, 2, 3, 1).reshape(1, -1, feats.shape[1])
        return self.proj(feats)[0].numpy()


def reference_llm(folder: Path) -> LlamaForCausalLM:
    cfg = json.loads((folder / "config.json").read_text())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings"]
    model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys})).eval()
    tensors = shard_tensors(folder, lambda k: not k.startswith(("model.vision_tower.", "model.mm_projector.")))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model


def official_prompt(turns: list[tuple[str, str | None]], counts: list[int] | None = None) -> str:
    """conv_vicuna_v1.get_prompt() with '<image>\\n' + the first question (SeparatorStyle.TWO); ``counts``: that
    many '<image>\\n' before each turn's question instead (LLaVA's convention for several images)."""
    seps = [" ", "</s>"]
    counts = counts if counts is not None else [1] + [0] * (len(turns) - 1)
    messages = []
    for (q, a), n in zip(turns, counts):
        messages.append(("USER", "<image>\n" * n + q))
        messages.append(("ASSISTANT", a))
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += (role + ": " + message + seps[i % 2]) if message else (role + ":")
    return ret


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava/mm_utils.py: chunks around <image>, first BOS kept, -200 where the image goes."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset, ids = 0, []
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [e for sub in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)) for e in sub][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


class ReferencePipeline:
    def __init__(self, checkpoint: Path, tower_dir: Path):
        self.vision = VisionReference(tower_dir, checkpoint)
        self.llm = reference_llm(checkpoint)
        self.tokenizer = LlamaTokenizer.from_pretrained(str(checkpoint))
        # Decoding goes through SentencePiece, as the official (slow) tokenizer's did: transformers 5's
        # LlamaTokenizer is the fast one, whose ByteFallback decoder writes one U+FFFD per byte of an
        # invalid UTF-8 run where SentencePiece writes one per invalid byte sequence.
        self.sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))

    def image_features(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.vision(self.vision.pixels(image)))

    @torch.no_grad()
    def generate(self, image: "Image.Image | list[list[Image.Image]]", turns: list[tuple[str, str | None]],
                 max_new_tokens: int) -> list[int]:
        """Greedy ids (EOS excluded), stopping at EOS or when the text holds '</s>'. ``image``: one image (in the
        first turn), or per turn the list of its images."""
        per_turn = [[image]] + [[] for _ in turns[1:]] if isinstance(image, Image.Image) else image
        ids = tokenizer_image_token(official_prompt(turns, [len(t) for t in per_turn]), self.tokenizer)
        embed = self.llm.get_input_embeddings()
        # prepare_inputs_labels_for_multimodal: the text between placeholders embedded, image i's features at the
        # i-th IMAGE_TOKEN_INDEX
        at = [-1] + [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] + [len(ids)]
        features = [self.image_features(img) for turn in per_turn for img in turn]
        assert len(features) == len(at) - 2
        parts = []
        for i in range(len(at) - 1):
            parts.append(embed(torch.tensor(ids[at[i] + 1:at[i + 1]], dtype=torch.long)))
            if i < len(features):
                parts.append(features[i])
        inputs = torch.cat(parts)[None]
        out, past = [], None
        for _ in range(max_new_tokens):
            result = self.llm(inputs_embeds=inputs, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            if token == self.tokenizer.eos_token_id:
                break
            out.append(token)
            if "</s>" in self.sp.decode(out):
                break
            inputs = embed(torch.tensor([[token]]))
        return out

    def decode(self, ids: list[int]) -> str:
        text = self.sp.decode([i for i in ids if not self.sp.is_control(i)]).strip()
        return text[: -len("</s>")] if text.endswith("</s>") else text
