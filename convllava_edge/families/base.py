"""What a model family is: everything that differs between ConvLLaVA, LLaVA-Mini and the next one.

A family is chosen once, from the manifest's ``family`` field (``family_for``), and nothing outside
families/ (and the export side's family modules) asks which family a bundle is. It says:
- which graphs a vision entry holds (``graphs``: role -> input and output names) and how they make an
  image's vision output (``encoder``): the array the embedding cache keeps;
- how many LLM positions that output takes (``slot_size``) and how it meets the text: injected as rows
  where the prompt's image slot is (``llm_rows`` returns None), or the whole prompt as rows;
- what the KV cache may keep: the text before the image when the image changes
  (``reuse_prefix_across_images``), states after the system prompt and the image on disk
  (``cache_kv_states``); whether ``ask`` may size its context from the square image's token count
  (``fit_context``); whether it reads videos (``video``); whether every prompt runs a graph
  (``vision_in_prompt``: else a one-shot answer may free the graphs once the image is encoded); how a
  conversation's several images meet the prompt: each at a placeholder of its own in its turn (LLaVA's), or
  all as the frames of one video at one placeholder (``images_as_frames``: LLaVA-Mini's official code takes one
  image or one video per conversation).
The prompt template, stop strings and the assistant header are the manifest's (``template``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import numpy as np

from ..errors import BundleError

if TYPE_CHECKING:
    from ..backends.base import Graph, VisionBackend
    from ..manifest import Manifest, VisionEntry
    from ..prompt import Item


class VisionEncoder(Protocol):
    """A bundle's vision graphs as one encoder (made by a family from graphs a backend loaded)."""

    providers: list[str]
    note: str
    threads: int

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [1, 3, H, W] -> the image's vision output (what the embedding cache keeps)."""
        ...

    def encode_both(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the tower's features, the vision output) in one run: ``check``'s two comparison points."""
        ...


class Family:
    name: str = ""
    graphs: dict[str, tuple[list[str], list[str]]] = {}  # role -> (inputs, outputs it must have)
    video: bool = False
    reuse_prefix_across_images: bool = True
    cache_kv_states: bool = True
    fit_context: bool = True
    vision_in_prompt: bool = False  # the graphs run again for every prompt (not only per image)
    images_as_frames: bool = False  # several images: one placeholder, the images as a video's frames

    def graph_files(self, entry: "VisionEntry") -> dict[str, str]:
        """Role -> the bundle file of each graph of ``entry``."""
        if entry.parts or len(self.graphs) != 1:
            return dict(entry.parts)
        (role,) = self.graphs
        return {role: entry.graph}

    def encoder(self, graphs: Mapping[str, "Graph"], backend: "VisionBackend") -> VisionEncoder:
        raise NotImplementedError

    def slot_size(self, manifest: "Manifest", vision: np.ndarray) -> int:
        """LLM positions an image's (or a video's) vision output takes: by default one per row."""
        return len(vision)

    def usable(self, manifest: "Manifest", vision: np.ndarray, video: bool = False) -> bool:
        """Whether a cached array is one this bundle makes ([n > 0, n_embd] float32; video: [frames, n, n_embd])."""
        return vision.dtype == np.float32 and vision.ndim == (3 if video else 2) \
            and vision.shape[-1] == manifest.n_embd and 0 not in vision.shape

    def llm_rows(self, encoder: VisionEncoder, items: Sequence["Item"],
                 vision_by_key: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The LLM's input rows for the whole prompt, or None: tokens, with the image's rows injected at its slot."""
        return None

    def encode_video(self, encoder: VisionEncoder, frames: Sequence[np.ndarray]) -> np.ndarray:
        """[frames, ...]: each frame's vision output (families with ``video``)."""
        return np.stack([encoder.encode(f) for f in frames])

    def validate(self, manifest: "Manifest", where: str) -> None:
        """Family-specific manifest checks (BundleError), after the generic ones."""
        missing = [role for role in self.graphs for e in manifest.vision if role not in self.graph_files(e)]
        if missing:
            raise BundleError(f"{where}: a {self.name} vision entry lacks the {', '.join(sorted(set(missing)))} graph(s)")
