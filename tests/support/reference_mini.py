"""LLaVA-Mini's reference pipeline, from transformers and torch modules, following the official code.

llavamini/model/llavamini_arch.py (encode_images_mini, Resampler), mm_utils.tokenizer_image_token,
conversation.py (LLAMA_3_1: the checkpoint's chat template, add_generation_prompt=False, the empty
assistant turn dropped), CLIP from the tower folder, hidden_states[-2] without CLS. Nothing here
uses convllava_edge's modules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from .reference import shard_tensors, tokenizer_image_token

IMAGE_TOKEN_INDEX = -200
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
          "user provides, and assist the user with a variety of tasks using natural language.")


def llama_config(checkpoint: Path) -> LlamaConfig:
    cfg = json.loads((checkpoint / "config.json").read_text())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
            "tie_word_embeddings", "head_dim"]
    config = LlamaConfig(**{k: cfg[k] for k in keys})
    config._attn_implementation = "eager"
    return config


class ReferenceMini:
    def __init__(self, checkpoint: Path, clip_dir: Path):
        cfg = json.loads((checkpoint / "config.json").read_text())
        self.processor = CLIPImageProcessorPil.from_pretrained(str(clip_dir))
        self.clip = CLIPVisionModel.from_pretrained(str(clip_dir), dtype=torch.float32).eval()
        t = {k: v.float() for k, v in shard_tensors(checkpoint, lambda k: k.startswith(("model.compressor.", "model.mm_projector.",
                                                                                         "model.prefusion_layers.", "model.embed_tokens.")))
             .items()}
        width = t["model.compressor.query"].shape[1]
        self.query, self.pos_embed = t["model.compressor.query"], t["model.compressor.pos_embed"]
        self.attn = torch.nn.MultiheadAttention(width, 8, batch_first=True)  # the official Resampler's attention
        self.attn.load_state_dict({k.removeprefix("model.compressor.attn."): v for k, v in t.items()
                                   if k.startswith("model.compressor.attn.")})
        self.ln_q, self.ln_kv = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.ln_q.load_state_dict({"weight": t["model.compressor.ln_q.weight"], "bias": t["model.compressor.ln_q.bias"]})
        self.ln_kv.load_state_dict({"weight": t["model.compressor.ln_kv.weight"], "bias": t["model.compressor.ln_kv.bias"]})
        d = t["model.mm_projector.0.weight"].shape[0]
        self.proj = torch.nn.Sequential(torch.nn.Linear(width, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        self.proj.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in t.items() if "mm_projector" in k})
        self.config = llama_config(checkpoint)
        self.layers = torch.nn.ModuleList([LlamaDecoderLayer(self.config, layer_idx=i)
                                           for i in range(cfg["prefusion_layer_num"])]).eval()
        self.layers.load_state_dict({k.removeprefix("model.prefusion_layers."): v for k, v in t.items()
                                     if k.startswith("model.prefusion_layers.")})
        self.rotary = LlamaRotaryEmbedding(self.config)
        self.llm = LlamaForCausalLM(self.config).eval()
        self.llm.load_state_dict({k: v.float() for k, v in shard_tensors(checkpoint, lambda k: not k.startswith(
            ("model.vision_tower.", "model.mm_projector.", "model.compressor.", "model.prefusion_layers."))).items()})
        tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"),
                                                 bos_token=tok_config["bos_token"], eos_token=tok_config["eos_token"])
        self.tokenizer.chat_template = tok_config["chat_template"]
        self.stop_ids = set(json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"])

    # -- the official data flow ------------------------------------------------------------------
    def pixels(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.processor(image.convert("RGB"), return_tensors="np")["pixel_values"])

    @torch.no_grad()
    def vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global tokens [1, N, d], compressed tokens [1, C*C, d]) before pre-fusion."""
        feats = self.clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        n_src, n_tgt = int(math.sqrt(self.pos_embed.shape[0])), int(math.sqrt(feats.shape[1]))
        key_pos = self.pos_embed if n_src == n_tgt else F.interpolate(
            self.pos_embed.reshape(1, n_src, n_src, -1).permute(0, 3, 1, 2), size=(n_tgt, n_tgt), mode="bicubic",
            align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)  # get_abs_pos
        x = self.ln_kv(feats)
        q = self.ln_q(self.query)
        out, _ = self.attn((q + self.pos_embed)[None].expand(x.size(0), -1, -1), x + key_pos[None], x)
        return self.proj(feats), self.proj(out)

    @torch.no_grad()
    def prefuse(self, global_tokens, compressed, input_ids: torch.Tensor):
        """encode_images_mini's pre-fusion: -> (compressed after fusion, fused text) as the official returns them."""
        embed = self.llm.get_input_embeddings()
        all_text = embed(input_ids.clamp(min=0))
        padding_mask = input_ids <= 0
        x = torch.cat([global_tokens, compressed, all_text], dim=1)
        mask = torch.cat([torch.zeros((1, global_tokens.size(1) + compressed.size(1)), dtype=torch.bool), padding_mask], 1)
        # _prepare_4d_causal_attention_mask(~mask, ...): causal, masked keys hidden, dtype-min fill
        t = x.size(1)
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & (~mask)[:, None, :]
        bias = torch.zeros(1, 1, t, t).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        position_ids = (~mask).long().cumsum(-1) - 1
        position_ids.masked_fill_(mask, 1)
        cos_sin = self.rotary(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=bias, position_ids=position_ids, position_embeddings=cos_sin)
            x = x[0] if isinstance(x, tuple) else x
        L = input_ids.size(1)
        fused = x[:, -L:]
        comp = x[:, -L - compressed.size(1):-L]
        fused = fused * (~padding_mask)[..., None] + all_text * padding_mask[..., None]
        return comp, fused

    def prompt(self, turns) -> str:
        messages = [{"role": "system", "content": SYSTEM}]
        for i, (q, a) in enumerate(turns):
            messages.append({"role": "user", "content": ("<image>\n" + q) if i == 0 else q})
            if a:
                messages.append({"role": "assistant", "content": a})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def input_ids(self, turns) -> list[int]:
        return tokenizer_image_token(self.prompt(turns), self.tokenizer)

    @torch.no_grad()
    def llm_inputs(self, frames: list[Image.Image], turns) -> torch.Tensor:
        """The LLM's inputs_embeds: fused text (mean over frames) with each frame's compressed token at the image."""
        ids = torch.tensor([self.input_ids(turns)])
        comps, text_sum = [], 0
        for frame in frames:
            comp, fused = self.prefuse(*self.vision(self.pixels(frame)), ids)
            comps.append(comp)
            text_sum = text_sum + fused.float()
        fused = (text_sum / len(frames))[0]
        at = ids[0].tolist().index(IMAGE_TOKEN_INDEX)
        return torch.cat([fused[:at], torch.cat(comps, dim=1)[0], fused[at + 1:]])

    @torch.no_grad()
    def margin_after(self, frames: list[Image.Image], turns, generated: list[int]) -> float:
        """top-1 minus top-2 logit after ``generated``: how close the reference's own choice was."""
        inputs = torch.cat([self.llm_inputs(frames, turns), self.llm.get_input_embeddings()(torch.tensor(generated,
                                                                                                     dtype=torch.long))])
        top = torch.topk(self.llm(inputs_embeds=inputs[None]).logits[0, -1], 2).values
        return float(top[0] - top[1])

    @torch.no_grad()
    def generate(self, frames: list[Image.Image], turns, max_new_tokens: int) -> list[int]:
        inputs = self.llm_inputs(frames, turns)[None]
        embed = self.llm.get_input_embeddings()
        out, past = [], None
        for _ in range(max_new_tokens):
            r = self.llm(inputs_embeds=inputs, past_key_values=past, use_cache=True)
            past, token = r.past_key_values, int(r.logits[0, -1].argmax())
            if token in self.stop_ids:
                break
            out.append(token)
            inputs = embed(torch.tensor([[token]]))
        return out
