"""``check --reference CHECKPOINT``: the checkpoint in PyTorch (the export extra: torch, transformers).

The vision side is the family's PyTorch module (its export family module says which); the LLM is the
checkpoint's Llama in transformers (fp32, or bf16 when fp32 would not fit), and beside it, as the
official 4-bit option, transformers + bitsandbytes NF4.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..decoding import TextStream, without_header
from ..errors import ConfigError
from ..export.checkpoint import TensorStore
from ..export.families import export_family_for
from ..prompt import ImageSlot, Item
from ..quantize.accuracy import log_softmax
from .references import MAX_ANSWER_TOKENS, Reference, after_image


class CheckpointReference(Reference):
    kind = "checkpoint"

    def __init__(self, path: Path, threads: int | None, vision_tower: Path | None = None):
        super().__init__(path, threads)
        self.vision_tower = vision_tower
        self.family = export_family_for(path)

    def vision_encoder(self, bundle: Path, manifest) -> tuple[str, Any]:
        return self.family.torch_vision_reference(self.path, self.vision_tower, manifest)

    def llm(self, piece, is_end) -> "TorchLlm":
        return TorchLlm("transformers (checkpoint)", self.path, is_end=is_end, piece=piece)

    def nf4_llm(self, piece, is_end) -> "TorchLlm":
        return TorchLlm("bitsandbytes NF4", self.path, nf4=True, is_end=is_end, piece=piece)


class TorchLlm:
    """The checkpoint's Llama in transformers (fp32, or bf16 when fp32 would not fit), optionally NF4."""

    def __init__(self, name: str, checkpoint: Path, nf4: bool = False, is_end: Callable[[int], bool] = lambda t: False,
                 piece: Callable[[int], bytes] = lambda t: b""):
        import torch

        self.name, self._torch, self._is_end, self._piece = name, torch, is_end, piece
        llm_config, _, not_llm = export_family_for(checkpoint).llm_config(checkpoint)
        store = TensorStore(checkpoint)
        keys = [k for k in store.keys() if not k.startswith(not_llm)]
        n_params = sum(math.prod(store.info(k).shape) for k in keys)
        dtype = torch.float32 if n_params * 4 < _available_memory() * 0.5 else torch.bfloat16
        self.dtype = str(dtype).removeprefix("torch.")
        config = _llama_config(llm_config)
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
        return out[after_image(items):]

    def answer(self, items: list[Item], embeds: dict[str, np.ndarray], stops: Sequence[str],
               hidden_prefix: Sequence[int] = (), rows: np.ndarray | None = None) -> list[int]:
        """The greedy answer's visible token ids (as BundleLlm.answer: a generated header left out)."""
        torch = self._torch
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
        return without_header(tokens, hidden_prefix)

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

