"""Images (and videos) -> the vision output the LLM receives, with the embedding cache in front.

A cache key names the image's content, the preprocessing and every graph that shaped the rows; the
outputs of the last few images are kept in memory as well (a conversation encodes each of its images once).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .cache import DiskCache, cache_key
from .errors import ConfigError
from .families import Family, VisionEncoder
from .image import open_image, read_image_bytes
from .manifest import Manifest
from .preprocess import preprocess, size_check
from .prompt import ImageSlot

ImageInput = str | os.PathLike | bytes | Image.Image
VideoInput = str | os.PathLike | bytes
# Vision outputs kept in memory, by key: a conversation's images (serve's --max-images is 8 by default) and the
# previous conversation's, on every slot. A 7B ConvLLaVA image is 576 x 4096 float32 rows: 9.4 MB each.
MEMORY_IMAGES = 16


@dataclass
class Embedded:
    slot: ImageSlot
    embeds: np.ndarray
    hit: bool  # from a cache, no encoder run
    preprocess_ms: float
    encode_ms: float

    @classmethod
    def none(cls) -> "Embedded":
        """A text-only prompt's."""
        return cls(ImageSlot("", 0), np.zeros((0, 0), np.float32), False, 0.0, 0.0)

    def reused(self) -> "Embedded":
        """The same rows, already in hand: nothing to preprocess or encode."""
        return Embedded(self.slot, self.embeds, True, 0.0, 0.0)


def images_summary(embedded: Sequence[Embedded]) -> tuple[int, bool, float, float]:
    """(image tokens, every one from a cache, preprocessing ms, encoding ms) of a prompt's images."""
    return (sum(e.slot.n_tokens for e in embedded), bool(embedded) and all(e.hit for e in embedded),
            sum(e.preprocess_ms for e in embedded), sum(e.encode_ms for e in embedded))


class ImageEmbedder:
    def __init__(self, manifest: Manifest, family: Family, encoder: VisionEncoder, graph_sha: str,
                 store: DiskCache | None = None):
        self.manifest, self.family, self.encoder, self.graph_sha, self.store = manifest, family, encoder, graph_sha, store
        self.preprocess_config = manifest.preprocess
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()  # vision outputs of recent images, by slot key

    def embed(self, image: ImageInput, aspect: str | None = None) -> Embedded:
        aspect = aspect or self.manifest.preprocess.aspect
        t0 = time.perf_counter()
        picture, digest, name = _source(image)
        key = cache_key(digest, self.manifest.preprocess.to_dict(), aspect, self.graph_sha)
        found = self._lookup(key, video=False)
        if found is not None:
            return Embedded(self._slot(key, found), found, True, (time.perf_counter() - t0) * 1e3, 0.0)
        fits = size_check(self.preprocess_config, aspect)  # refused from the header, before any pixel is decoded
        pixels = preprocess(open_image(picture, name=name, fits=fits), self.preprocess_config, aspect)
        t1 = time.perf_counter()
        embeds = self._encoder().encode(pixels)
        return self._store(key, embeds, t0, t1)

    def embed_video(self, video: VideoInput) -> Embedded:
        """About one frame per second, each through the vision graphs (families with ``video``)."""
        from .video import read_frames

        if not self.family.video:
            raise ConfigError(f"video needs a LLaVA-Mini bundle, or another family that reads videos "
                              f"(this one is {self.manifest.family})")
        t0 = time.perf_counter()
        frames, data = read_frames(video, self.preprocess_config.image_size)
        key = cache_key(hashlib.sha256(data).hexdigest(), self.manifest.preprocess.to_dict(), "video-1fps", self.graph_sha)
        found = self._lookup(key, video=True)
        if found is not None:
            return Embedded(self._slot(key, found), found, True, (time.perf_counter() - t0) * 1e3, 0.0)
        pixels = [preprocess(f, self.preprocess_config, "crop") for f in frames]
        t1 = time.perf_counter()
        return self._store(key, self.family.encode_video(self._encoder(), pixels), t0, t1)

    def keep(self, embedded: Embedded) -> None:
        """In memory, as the most recent (the oldest beyond MEMORY_IMAGES forgotten)."""
        self.memory[embedded.slot.key] = embedded.embeds
        self.memory.move_to_end(embedded.slot.key)
        while len(self.memory) > MEMORY_IMAGES:
            self.memory.popitem(last=False)

    def forget(self) -> None:
        self.memory = OrderedDict()

    def as_frames(self, embedded: Sequence[Embedded]) -> Embedded:
        """Several images as the frames of one video (LLaVA-Mini's path for them, Family.images_as_frames): each
        image's own vision output (preprocessed as a single image is), stacked in order, at one slot."""
        if len(embedded) == 1:
            return embedded[0]
        if any(e.embeds.ndim != 2 for e in embedded):
            raise ConfigError("a video takes a conversation of its own: it cannot be sent with other images or videos")
        key = hashlib.sha256(("frames|" + ",".join(e.slot.key for e in embedded)).encode()).hexdigest()
        stacked = np.stack([e.embeds for e in embedded])
        tokens, hit, preprocess_ms, encode_ms = images_summary(embedded)
        return Embedded(self._slot(key, stacked), stacked, hit, preprocess_ms, encode_ms)

    def _encoder(self) -> VisionEncoder:
        if self.encoder is None:
            raise ConfigError("this model released its vision graphs (release_vision): it cannot encode another image")
        return self.encoder

    def _slot(self, key: str, embeds: np.ndarray) -> ImageSlot:
        return ImageSlot(key, self.family.slot_size(self.manifest, embeds))

    def _lookup(self, key: str, video: bool) -> np.ndarray | None:
        """From memory, else from the disk cache when the entry is an array this bundle makes (a miss
        otherwise: the image is encoded again and the entry rewritten; DiskCache.get already
        checked its checksum and that its values are finite)."""
        found = self.memory.get(key)
        if found is not None:
            self.memory.move_to_end(key)
        if found is None and self.store is not None:
            found = self.store.get(key)
            if found is not None and not self.family.usable(self.manifest, found, video):
                found = None
        return found

    def _store(self, key: str, embeds: np.ndarray, t0: float, t1: float) -> Embedded:
        t2 = time.perf_counter()
        if self.store is not None:
            self.store.put(key, embeds)
        embedded = Embedded(self._slot(key, embeds), embeds, False, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        self.keep(embedded)
        return embedded


def _source(image: ImageInput) -> tuple[ImageInput, str, str | None]:
    """The image source, a digest of its content (file bytes, or pixels for a PIL image) and its name
    for messages (None: no name)."""
    if isinstance(image, Image.Image):
        h = hashlib.sha256(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
        return image, h.hexdigest(), None
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), hashlib.sha256(image).hexdigest(), None
    name, data = read_image_bytes(image, sniff=True)
    return data, hashlib.sha256(data).hexdigest(), name
