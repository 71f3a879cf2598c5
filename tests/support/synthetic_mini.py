"""Random LLaVA-Mini checkpoints in the released layout (ICTNLP/llava-mini-llama-3.1-8b), for tests.

The sft folder: config.json (model_type llava_mini_llama and the keys its training script writes),
safetensors shards with index, the Llama under HF names, ``model.mm_projector.{0,2}``,
``model.compressor.*`` (the Resampler: query, pos_embed, attn.in_proj_*/out_proj.*, ln_q, ln_kv),
``model.prefusion_layers.N.*`` and a CLIP copy under ``model.vision_tower.vision_tower.vision_model.*``;
a byte-level BPE tokenizer.json with Llama-3's pre-tokenizer and special tokens in Llama-3.1's order,
tokenizer_config.json with a Llama-3.1-style chat template. The CLIP folder: config.json (CLIPConfig
with vision_config), model.safetensors, preprocessor_config.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from convllava_edge.preprocess import CLIP_MEAN, CLIP_STD
from convllava_edge.export.convllava.synthetic import LlamaSpec, _normal, _randomize, random_llama_state, save_tensors, write_json

# head size 64 as in ViT-L/14 (1024 wide, 16 heads): the shard copy carries no config, and heads are
# inferred as width / 64
TINY_CLIP = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                             image_size=112, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# Llama-3.1's first special tokens, in their order from 128000 (here from the end of the BPE vocabulary)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
MINI_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
               "that the user provides, and assist the user with a variety of tasks using natural language.")
# The shape of Llama-3.1-Instruct's template (its system header with the knowledge/today dates, trimmed
# contents, <|eot_id|> after each turn), without the tool-calling branches.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """MAE's 2D sin-cos position embedding [grid*grid, width] (what the official Resampler stores).

    As get_2d_sincos_pos_embed: meshgrid(w, h), the first half of the channels encodes w, the second h.
    """
    coords_w, coords_h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_d(width // 2, coords_w), one_d(width // 2, coords_h)], axis=1)
                            .astype(np.float32))


def random_clip_state(config: CLIPVisionConfig, seed: int) -> dict[str, torch.Tensor]:
    """CLIP vision weights under the released names (``vision_model.*``, as in CLIPModel checkpoints)."""
    gen = torch.Generator().manual_seed(seed)
    names = CLIPVisionModel(config).state_dict()
    state = {}
    for name, p in names.items():
        if "position_ids" in name:
            continue
        if name.endswith("position_embedding.weight") or name.endswith("class_embedding"):
            state["vision_model." + name] = _normal(gen, p.shape, 0.02)
        else:
            state["vision_model." + name] = _randomize(name, p.shape, gen)
    return state


def random_mini_state(llm: LlamaSpec, width: int, n_queries: int, n_prefusion: int, seed: int) -> dict[str, torch.Tensor]:
    """Compressor, projector and pre-fusion layers under their checkpoint names."""
    gen = torch.Generator().manual_seed(seed)
    d = llm.hidden_size
    state = {
        "model.compressor.query": _normal(gen, (n_queries, width), 0.5),
        "model.compressor.pos_embed": sincos_2d(width, int(math.isqrt(n_queries))),
        "model.compressor.attn.in_proj_weight": _normal(gen, (3 * width, width), 1 / math.sqrt(width)),
        "model.compressor.attn.in_proj_bias": _normal(gen, (3 * width,), 0.01),
        "model.compressor.attn.out_proj.weight": _normal(gen, (width, width), 1 / math.sqrt(width)),
        "model.compressor.attn.out_proj.bias": _normal(gen, (width,), 0.01),
        "model.compressor.ln_q.weight": _normal(gen, (width,), 0.05, 1.0),
        "model.compressor.ln_q.bias": _normal(gen, (width,), 0.01),
        "model.compressor.ln_kv.weight": _normal(gen, (width,), 0.05, 1.0),
        "model.compressor.ln_kv.bias": _normal(gen, (width,), 0.01),
        "model.mm_projector.0.weight": _normal(gen, (d, width), 1 / math.sqrt(width)),
        "model.mm_projector.0.bias": _normal(gen, (d,), 0.01),
        "model.mm_projector.2.weight": _normal(gen, (d, d), 1 / math.sqrt(d)),
        "model.mm_projector.2.bias": _normal(gen, (d,), 0.01),
    }
    layers = random_llama_state(LlamaSpec(**{**llm.__dict__, "num_hidden_layers": n_prefusion}), seed + 1)
    for key, value in layers.items():
        if key.startswith("model.layers."):
            state[key.replace("model.layers.", "model.prefusion_layers.")] = value
    return state


def write_bpe_tokenizer(folder: Path, corpus: list[str], vocab_size: int) -> dict[str, int]:
    """A byte-level BPE in Llama-3's format; returns the special tokens' ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    bos = ids["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for t, i in ids.items()},
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(folder / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    write_json(folder / "generation_config.json", {
        "bos_token_id": bos, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]})
    return ids


def mini_corpus() -> list[str]:
    words = ("the a image picture photo shows what is are there how many color shape left right red green blue "
             "yellow circle square triangle yes no one two three describe question answer this that it small large "
             "you helpful language vision assistant able understand visual content user provides variety tasks "
             "natural cutting knowledge date december today jul system").split()
    rng = np.random.default_rng(7)
    lines = [MINI_SYSTEM, "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "user", "assistant"]
    for _ in range(600):
        n = int(rng.integers(3, 12))
        lines.append(" ".join(words[int(i)] for i in rng.integers(0, len(words), n)) + "? 12, 345! café 漢字 ok.\n")
    return lines


def write_tiny_llava_mini(root: Path, *, seed: int = 0, llm: LlamaSpec | None = None, clip: CLIPVisionConfig = TINY_CLIP,
                          compressor_size: int = 1, n_prefusion: int = 2, shards: int = 2,
                          include_tower_copy: bool = True) -> tuple[Path, Path]:
    """``root/sft`` (checkpoint) and ``root/clip`` (tower folder); returns both paths."""
    root = Path(root)
    sft, clip_dir = root / "sft", root / "clip"
    sft.mkdir(parents=True, exist_ok=True)
    special = write_bpe_tokenizer(sft, mini_corpus(), vocab_size=768)
    vocab = max(special.values()) + 1
    llm = llm or LlamaSpec(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, rope_theta=500000.0, logit_scale=4.0)
    llm = LlamaSpec(**{**llm.__dict__, "vocab_size": vocab})
    clip_state = random_clip_state(clip, seed)
    mini = random_mini_state(llm, clip.hidden_size, compressor_size ** 2, n_prefusion, seed + 2)
    llm_state = random_llama_state(llm, seed + 3)
    # CLIP folder
    clip_dir.mkdir(parents=True, exist_ok=True)
    write_json(clip_dir / "config.json", {"model_type": "clip", "architectures": ["CLIPModel"],
                                          "vision_config": clip.to_dict(), "projection_dim": 32})
    save_tensors(clip_dir, clip_state, fmt="safetensors", shards=1, dtype=torch.float32)
    write_json(clip_dir / "preprocessor_config.json", {
        "crop_size": {"height": clip.image_size, "width": clip.image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": clip.image_size},
        "image_processor_type": "CLIPImageProcessor"})
    # sft folder
    config = {
        "architectures": ["LlavaMiniLlamaForCausalLM"], "model_type": "llava_mini_llama",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads, "head_dim": llm.hidden_size // llm.num_attention_heads,
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta, "rope_scaling": LLAMA3_ROPE, "vocab_size": vocab, "tie_word_embeddings": False,
        "bos_token_id": special["<|begin_of_text|>"],
        "eos_token_id": [special["<|end_of_text|>"], special["<|eom_id|>"], special["<|eot_id|>"]],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": clip.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "square",
        "compressor_size": compressor_size, "prefusion_layer_num": n_prefusion, "resolution_ratio": 1,
        "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
        "use_mm_proj": True, "transformers_version": "4.44.2",
    }
    write_json(sft / "config.json", config)
    tensors = {k: v for k, v in llm_state.items() if k != "lm_head.weight"}
    tensors.update(mini)
    if include_tower_copy:
        tensors.update({"model.vision_tower.vision_tower." + k: v for k, v in clip_state.items()})
    tensors["lm_head.weight"] = llm_state["lm_head.weight"]
    save_tensors(sft, tensors, fmt="safetensors", shards=shards, dtype=torch.bfloat16)
    return sft, clip_dir
