"""llama.cpp's ``llama_batch``, filled as the backend (llm_llamacpp.py) and the guard's child (native.py) both
fill it: a module of its own so that neither imports the other for it."""

from __future__ import annotations


def batch_slot(batch, i: int, pos: int, last: bool) -> None:
    """Entry ``i`` of a llama_batch: position ``pos`` of sequence 0, logits kept when ``last``."""
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = 0
    batch.logits[i] = last
