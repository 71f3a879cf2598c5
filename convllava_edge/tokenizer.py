"""The prompt's token ids, as the checkpoint's own tokenizer makes them, computed with the GGUF's vocabulary."""

from __future__ import annotations

import re
from typing import Sequence

from .backends.base import LlmBackend
from .errors import BundleError
from .prompt import IMAGE_TOKEN, ImageSlot, Item, splice

_SENTINEL = "\x01"  # see PromptTokenizer._ids_without_prefix


class PromptTokenizer:
    """``tokenizer(chunk).input_ids`` of the checkpoint's tokenizer, computed with the GGUF's vocabulary."""

    def __init__(self, llm: LlmBackend, info: dict):
        self.llm = llm
        self.bpe = info.get("kind") == "bpe"  # Llama-3: HF's fast tokenizer, whose chunks need no dummy-prefix rules
        self.add_space_prefix = info.get("add_space_prefix", True)
        self.space_after_special = info.get("space_after_special", True)
        self.specials = llm.special_tokens()  # "<s>", "</s>", "<unk>" -> ids, as the HF tokenizer parses them
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def chunk(self, text: str) -> list[int]:
        """BOS, then the text's ids; special tokens written in the text become their ids."""
        if self.bpe:
            return self.llm.tokenize(text, add_bos=True, parse_special=True)
        ids = [self.llm.bos]
        after_special = False
        for part in self._split.split(text) if self._split else [text]:
            if part in self.specials:
                ids.append(self.specials[part])
                after_special = True
            elif part:
                prefix = not after_special or self.space_after_special
                ids += self.llm.tokenize(part) if prefix else self._ids_without_prefix(part)
                after_special = False
        return ids

    def items(self, prompt: str, slots: "ImageSlot | Sequence[ImageSlot] | None") -> list[Item]:
        """The rendered prompt as token ids with image slot i where the i-th ``<image>`` was (none: text only)."""
        if slots is None or (not isinstance(slots, ImageSlot) and not slots):
            return self.chunk(prompt)
        return splice([self.chunk(c) for c in prompt.split(IMAGE_TOKEN)], slots, self.llm.bos)

    def _ids_without_prefix(self, text: str) -> list[int]:
        """Tokenize ``text`` without SentencePiece's dummy-prefix space.

        HF's tokenizer with ``legacy: false`` adds no space to text that follows a special token
        (``</s>USER:`` -> ``US ER :``); llama.cpp always does. A leading control byte cannot merge with
        any piece, so tokenizing it first and dropping its tokens leaves the text's own ids -- the
        same trick HF itself plays with ``<unk>``.
        """
        if not self.add_space_prefix:
            return self.llm.tokenize(text)
        probe = self.llm.tokenize(_SENTINEL)
        ids = self.llm.tokenize(_SENTINEL + text)
        if ids[: len(probe)] != probe:
            raise BundleError("the vocabulary merges a control byte with text; cannot tokenize without a prefix")
        return ids[len(probe):]
