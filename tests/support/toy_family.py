"""A third model family that exists only in the tests (runtime side): a tiny conv tower on a 64 px image
whose output becomes 4 LLM rows, placed AFTER the question by its own template.

Its graph has its own names (input "image", outputs "pooled" and "tokens") so nothing can run it by
assuming ConvLLaVA's. Registered with convllava_edge.families.register; its bundles come from
toy_family_export.py. Nothing in the product names it.
"""

from __future__ import annotations

import numpy as np

from convllava_edge.families import Family

NAME = "toy"
ROWS = 4


class ToyEncoder:
    def __init__(self, graph, backend):
        self.graph = graph
        self.providers, self.note, self.threads = backend.providers, backend.note, backend.threads

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.encode_both(pixel_values)[1]

    def encode_both(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pooled, tokens = self.graph.run(["pooled", "tokens"], {"image": pixel_values.astype(np.float32)})
        return pooled[0], tokens[0]


class Toy(Family):
    name = NAME
    graphs = {"pool": (["image"], ["pooled", "tokens"])}
    cache_kv_states = False  # the state after the image holds the question: nothing to share between prompts

    def encoder(self, graphs, backend) -> ToyEncoder:
        return ToyEncoder(graphs["pool"], backend)


FAMILY = Toy()
