"""ConvLLaVA: one graph (ConvNeXt tower, 5th stage, projector) whose rows are injected at the image slot.

pixel_values [1, 3, H, W] -> image_embeds [1, (H/64) * (W/64), n_embd], tokens in row-major order; the
graph also gives image_features (before the projector) for ``check``. The KV state before the image
(the system prompt) holds nothing of the image, and the state after it nothing of the question: both
are kept on disk and reused.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import BundleError, ConfigError
from .base import Family

INPUT_NAME = "pixel_values"  # [1, 3, H, W] float32, H and W multiples of the total stride
OUTPUT_NAME = "image_embeds"  # [1, (H/64) * (W/64), n_embd] float32, tokens in row-major order
FEATURES_NAME = "image_features"  # [1, (H/64) * (W/64), C_tower]: before the projector (for accuracy checks)


class ConvLlavaEncoder:
    def __init__(self, graph, backend):
        self.graph, self.path = graph, graph.path
        self.providers, self.note, self.threads = backend.providers, backend.note, backend.threads

    @classmethod
    def from_file(cls, path, device: str = "auto", threads: int | None = None, backend=None) -> "ConvLlavaEncoder":
        """One graph file on ONNX Runtime, or on ``backend`` (the export, tests and benchmarks hold a graph, not a
        bundle)."""
        from ..backends import open_vision_backend

        backend = backend or open_vision_backend(device, threads)
        return cls(backend.load(path, *CONVLLAVA.graphs["vision"]), backend)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run(pixel_values, [OUTPUT_NAME])[0]

    def encode_both(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if FEATURES_NAME not in self.graph.output_names:
            raise BundleError(f"{self.path}: graph has no {FEATURES_NAME!r} output (exported by an older version)")
        features, embeds = self._run(pixel_values, [FEATURES_NAME, OUTPUT_NAME])
        return features, embeds

    def _run(self, pixel_values: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if pixel_values.ndim != 4 or pixel_values.shape[:2] != (1, 3):
            raise ConfigError(f"pixel_values must be [1, 3, H, W], got {list(pixel_values.shape)}")
        results = self.graph.run(outputs, {INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)})
        return [r[0] for r in results]


class ConvLlava(Family):
    name = "convllava"
    graphs = {"vision": ([INPUT_NAME], [OUTPUT_NAME])}

    def encoder(self, graphs: Mapping, backend) -> ConvLlavaEncoder:
        return ConvLlavaEncoder(graphs["vision"], backend)


CONVLLAVA = ConvLlava()
FAMILY = CONVLLAVA
