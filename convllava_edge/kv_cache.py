"""What the LLM's KV cache holds, item by item, and how the next prompt reuses it.

The record (token ids and image slots, whose keys name the image, its preprocessing and the graphs)
lets a prompt evaluate only what differs from the last one, as the official code's full
re-tokenization would produce it: reuse never changes ids. Where the family allows it, the states
after the system prompt and after the image are also kept on disk (llama.cpp's own state format),
so a later ``ask``, even in another process, starts after the image it saw before, or else after the
system prompt. A backend without ``kv_reuse`` starts every prompt at 0; one without ``save_state``
skips the disk.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np

from .backends.base import LlmBackend
from .cache import DiskCache
from .families import Family
from .prompt import ImageSlot, Item, common_prefix, image_end, positions


def evaluate_items(llm: LlmBackend, items: Sequence[Item], rows_by_key: dict[str, np.ndarray],
                   on_item: Callable[[Item], None] = lambda item: None,
                   on_logits: Callable[[np.ndarray], None] | None = None) -> int:
    """Evaluate ``items`` at the next positions: runs of tokens batched, image slots injected.

    Returns the number of positions evaluated; ``on_item`` sees each item once it is in the KV cache;
    ``on_logits`` (quantize/accuracy.py) the logits of every text position after the first image, run by run.
    """
    evaluated, i, seen_image = 0, 0, False
    while i < len(items):
        if isinstance(items[i], ImageSlot):
            llm.eval_embeddings(rows_by_key[items[i].key])
            evaluated += items[i].n_tokens
            on_item(items[i])
            i, seen_image = i + 1, True
            continue
        j = i
        while j < len(items) and not isinstance(items[j], ImageSlot):
            j += 1
        wanted = on_logits is not None and seen_image
        logits = llm.eval_tokens(list(items[i:j]), all_logits=wanted)
        if wanted:
            on_logits(logits)
        evaluated += j - i
        for token in items[i:j]:
            on_item(token)
        i = j
    return evaluated


def image_slot(items: Sequence[Item]) -> ImageSlot | None:
    return next((i for i in items if isinstance(i, ImageSlot)), None)


class KvCache:
    """The record of one LLM sequence and the disk store of its reusable states."""

    def __init__(self, llm: LlmBackend, family: Family, llm_sha: str, store: DiskCache | None = None):
        self.llm, self.family, self.llm_sha, self.store = llm, family, llm_sha, store
        self.items: list[Item] = []

    def state_key(self, prefix: Sequence[Item]) -> str:
        """Disk key of the KV state after ``prefix``, for this GGUF and KV type."""
        text = ",".join(f"i{it.key}" if isinstance(it, ImageSlot) else str(it) for it in prefix)
        kv_type = self.llm.settings.get("kv_type", "")
        return hashlib.sha256(f"kv2|{self.llm_sha}|{kv_type}|{text}".encode()).hexdigest()

    def reusable(self, items: Sequence[Item]) -> int:
        """Leading items of ``items`` the KV cache holds already (the last item is always evaluated:
        its logits start the answer)."""
        if not self.llm.capabilities.kv_reuse:
            return 0
        keep = common_prefix(self.items, items)
        if not self.family.reuse_prefix_across_images and image_slot(self.items) != image_slot(items):
            keep = 0  # the text before the image depends on the image (LLaVA-Mini's pre-fusion)
        return min(keep, len(items) - 1)

    def prefill(self, items: list[Item], rows_by_key: dict[str, np.ndarray], rows: np.ndarray | None = None) -> int:
        """Make the KV cache hold ``items``; returns the positions evaluated. ``rows``: the whole prompt
        as input rows (the family's llm_rows), else tokens with image rows from ``rows_by_key``."""
        keep = self.reusable(items)
        to_store = []  # (boundary, key): states to save on the way
        if self.store is not None and self.family.cache_kv_states and self.llm.capabilities.save_state:
            end = image_end(items)
            for boundary in (end, end - 1):  # after the image; after the text before it
                if not keep < boundary < len(items):
                    continue
                key = self.state_key(items[:boundary])
                state = self.store.get(key)
                if state is not None and state.dtype == np.uint8 and state.ndim == 1:
                    if self.llm.load_sequence(state.tobytes(), positions(items[:boundary])):
                        keep = boundary
                        break
                    keep = 0  # a refused state leaves the KV cache empty
                to_store.append((boundary, key))
        start = positions(items[:keep])
        self.llm.truncate(start)
        self.items = list(items[:keep])
        if rows is not None:
            self.llm.eval_embeddings(rows[start:])
            self.items.extend(items[keep:])
            return len(rows) - start
        evaluated, done = 0, keep
        for boundary, key in sorted(to_store):
            if boundary > done:
                evaluated += evaluate_items(self.llm, items[done:boundary], rows_by_key, self.items.append)
                self.store.put(key, np.frombuffer(self.llm.save_sequence(), np.uint8))
                done = boundary
        return evaluated + evaluate_items(self.llm, items[done:], rows_by_key, self.items.append)

    def record_answer(self, tokens: Sequence[int]) -> None:
        """The answer's tokens that were evaluated into the KV cache (all but the last, mostly)."""
        evaluated = self.llm.n_past - positions(self.items)
        self.items.extend(tokens[:max(evaluated, 0)])

    def reset(self) -> None:
        self.llm.truncate(0)
        self.items = []
