"""LLaVA-Mini: three graphs (CLIP, compressor, pre-fusion) and the prompt they fuse.

The data flow of the official code (see export/llava_mini/modules.py): CLIP's penultimate features are
projected (the global tokens) and compressed to C*C tokens; the pre-fusion layers run over
[global | compressed | prompt embeddings]; the LLM then receives the fused prompt with the
compressed token(s) where the image was. The compressed token never sees the text (the mask is
causal), but the fused text depends on the image: so the image's outputs are cached and pre-fusion
runs for every new prompt. Every text row sees the image, the rows before <image> included: no KV
state is shared between two images, and none is worth keeping on disk (the question is in every row).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import BundleError
from ..prompt import ImageSlot, Item, image_end
from .base import Family

GRAPH_IO = {"clip": (["pixel_values"], ["image_features"]),
            "compress": (["image_features"], ["global_tokens", "compressed_tokens"]),
            "prefusion": (["vision_tokens", "input_ids"], ["fused_text", "compressed_fused"])}
PLACEHOLDER_ID = -200  # the official IMAGE_TOKEN_INDEX; pre-fusion masks every id <= 0


class MiniEncoder:
    """The three graphs on a vision backend; arrays without the batch axis in and out."""

    def __init__(self, graphs: Mapping, backend):
        self.graphs = dict(graphs)
        self.providers, self.note, self.threads = backend.providers, backend.note, backend.threads

    @classmethod
    def from_files(cls, paths: Mapping[str, object], device: str = "auto", threads: int | None = None,
                   backend=None) -> "MiniEncoder":
        """The three graph files on ONNX Runtime, or on ``backend`` (the export's validation, which holds files,
        not a bundle)."""
        from ..backends import open_vision_backend

        missing = [g for g in GRAPH_IO if g not in paths]
        if missing:
            raise BundleError(f"LLaVA-Mini bundle lacks the {', '.join(missing)} graph(s)")
        backend = backend or open_vision_backend(device, threads)
        return cls({g: backend.load(paths[g], *GRAPH_IO[g]) for g in GRAPH_IO}, backend)

    def _run(self, graph: str, *arrays: np.ndarray) -> list[np.ndarray]:
        inputs, outputs = GRAPH_IO[graph]
        feed = {name: np.ascontiguousarray(a) for name, a in zip(inputs, arrays)}
        return [r[0] for r in self.graphs[graph].run(outputs, feed)]

    def clip(self, pixel_values: np.ndarray) -> np.ndarray:
        """[1, 3, S, S] -> [N, width]."""
        return self._run("clip", pixel_values.astype(np.float32))[0]

    def compress(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, width] -> (global tokens [N, d], compressed tokens [C*C, d])."""
        global_tokens, compressed = self._run("compress", features.reshape(1, *features.shape[-2:]).astype(np.float32))
        return global_tokens, compressed

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixels -> vision tokens [N + C*C, d]: what pre-fusion takes, and what the cache keeps."""
        return np.concatenate(self.compress(self.clip(pixel_values)))

    def encode_both(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP features [N, width], vision tokens [N + C*C, d]): for accuracy checks, before and after."""
        features = self.clip(pixel_values)
        return features, np.concatenate(self.compress(features))

    def prefuse(self, vision_tokens: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([N + C*C, d], ids [L] or [1, L]) -> (fused text [L, d], compressed after pre-fusion [C*C, d])."""
        vision = vision_tokens.reshape(1, *vision_tokens.shape[-2:]).astype(np.float32)
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        fused, compressed = self._run("prefusion", vision, ids)
        return fused, compressed


def prompt_rows(encoder: MiniEncoder, items: Sequence[Item], vision_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
    """The LLM's input rows for a LLaVA-Mini prompt: fused text with the compressed token(s) spliced in.

    Pre-fusion sees the prompt's ids with PLACEHOLDER_ID where the image slot is; the slot's vision
    tokens (``vision_by_key[slot.key]``) are [N + C*C, d] for an image or [frames, N + C*C, d] for a
    video, each frame fused separately, the fused text averaged over frames (in fp32) and the frames'
    compressed tokens concatenated, as the official code does.
    """
    at = image_end(items) - 1
    ids = np.array([PLACEHOLDER_ID if isinstance(item, ImageSlot) else item for item in items], dtype=np.int64)
    vision = vision_by_key[items[at].key]
    frames = vision if vision.ndim == 3 else vision[None]
    fused_sum, compressed = 0.0, []
    for frame in frames:
        fused, comp = encoder.prefuse(frame, ids)
        fused_sum = fused_sum + fused.astype(np.float32)
        compressed.append(comp)
    fused = (fused_sum / len(frames)).astype(np.float32)
    return np.concatenate([fused[:at], *compressed, fused[at + 1:]])


class LlavaMini(Family):
    name = "llava-mini"
    graphs = GRAPH_IO
    video = True
    reuse_prefix_across_images = False
    cache_kv_states = False
    fit_context = False  # a video's frames take one position each: the model's context
    vision_in_prompt = True  # pre-fusion runs over every prompt
    images_as_frames = True  # the official code's video path: frames in order, fused text averaged

    def encoder(self, graphs: Mapping, backend) -> MiniEncoder:
        return MiniEncoder(graphs, backend)

    def slot_size(self, manifest, vision: np.ndarray) -> int:
        """C*C positions per image or video frame."""
        frames = vision.shape[0] if vision.ndim == 3 else 1
        return frames * manifest.tokens_per_image.compressed

    def llm_rows(self, encoder, items, vision_by_key):
        """The whole prompt as rows (fused text, compressed token(s)); a prompt without an image skips
        pre-fusion (plain tokens, as the official code does)."""
        if not any(isinstance(item, ImageSlot) for item in items):
            return None
        return prompt_rows(encoder, items, vision_by_key)

    def validate(self, manifest, where: str) -> None:
        super().validate(manifest, where)
        if manifest.tokens_per_image.compressed is None:
            raise BundleError(f"{where}: a llava-mini manifest needs tokens_per_image.compressed")


FAMILY = LlavaMini()
