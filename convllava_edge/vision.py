"""A bundle's vision side, opened in one place: the family's graphs, loaded by a vision backend.

``ask``, ``encode``, ``check`` and ``bench`` all get their encoder from ``open_encoder``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backends import open_vision_backend
from .backends.base import VisionBackend
from .families import VisionEncoder, family_for
from .manifest import Manifest, VisionEntry, resolve_inside


def precision_of(entry: VisionEntry) -> str:
    """The arithmetic a vision type runs in: bf16 for the bf16 type, fp32 for every other (fp16 and int8 graphs
    compute what they do not quantize in fp32)."""
    return "bf16" if entry.variant == "bf16" else "fp32"


def open_encoder(bundle: str | os.PathLike, manifest: Manifest, entry: VisionEntry | str | None = None,
                 device: str = "auto", threads: int | None = None, backend: VisionBackend | None = None,
                 kind: str = "onnxruntime") -> VisionEncoder:
    """The encoder of ``entry`` (a VisionEntry, a variant name, or None for the bundle's default) on the
    vision backend ``kind`` (or ``backend``, already open)."""
    if not isinstance(entry, VisionEntry):
        entry = manifest.vision_entry(entry)
    family = family_for(manifest.family)
    backend = backend or open_vision_backend(device, threads, kind, precision=precision_of(entry))
    graphs = {role: backend.load(resolve_inside(Path(bundle), file), *family.graphs[role])
              for role, file in family.graph_files(entry).items()}
    return family.encoder(graphs, backend)


__all__ = ["VisionEncoder", "open_encoder"]
