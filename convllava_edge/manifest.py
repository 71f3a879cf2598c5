"""A bundle's manifest.json: one frozen description of every file and how to run them.

Only ``load_manifest`` touches disk. It refuses any file name that could lead outside the bundle
(absolute paths, ``..``, symbolic links pointing out) before reading anything, and checks every
file's size and SHA-256 against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAMILIES = ("convllava", "llava-mini")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the bundle, '/'-separated
    sha256: str
    size: int

    @classmethod
    def of(cls, bundle: Path, path: Path) -> "FileRecord":
        return cls(path=path.relative_to(bundle).as_posix(), sha256=sha256_file(path), size=path.stat().st_size)


@dataclass(frozen=True)
class VisionEntry:
    variant: str  # fp32 | fp16 | int8
    graph: str  # the .onnx file (its external data, if any, is listed in ``files``)
    files: tuple[str, ...]
    method: str  # how it was made, in words
    tensorrt_ready: bool
    accuracy: dict[str, Any] | None = None  # against fp32 on probe images: cosine_mean, cosine_min, rel_l2
    parts: dict[str, str] = field(default_factory=dict)  # multi-graph families: role -> file (LLaVA-Mini: clip, compress, prefusion)


@dataclass(frozen=True)
class LlmEntry:
    file: str
    type: str  # the requested llama.cpp file type: Q4_K_M, Q8_0, F16, ...
    tensor_types: dict[str, int]  # GGML type -> tensor count, as actually written
    n_ctx_train: int
    fallbacks: int = 0  # tensors llama.cpp stored in another type than requested


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    family: str  # convllava | llava-mini
    name: str
    created_with: str  # "convllava-edge 0.1.0"
    files: tuple[FileRecord, ...]
    preprocess: dict[str, Any]  # PreprocessConfig.to_dict() plus "aspect", the default mode
    n_embd: int  # width of the image embeddings = the LLM's embedding width
    tokens_per_image: dict[str, Any]  # {"stride": 64, "rule": ..., "square": n}
    vision: tuple[VisionEntry, ...]  # the first is the default
    tower: dict[str, Any] = field(default_factory=dict)  # depths, hidden_sizes, patch_size, projector (for FLOP counts)
    llm: LlmEntry | None = None
    template: dict[str, Any] | None = None  # prompt.Template.to_dict()
    tokenizer: dict[str, Any] = field(default_factory=dict)  # add_space_prefix, space_after_special (HF "legacy")
    accuracy: dict[str, Any] = field(default_factory=dict)  # figures measured at export
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint name, notes

    def vision_entry(self, variant: str | None = None) -> VisionEntry:
        if variant is None:
            return self.vision[0]
        for entry in self.vision:
            if entry.variant == variant:
                return entry
        raise BundleError(f"bundle {self.name!r} has no {variant} vision graph "
                          f"(it has: {', '.join(e.variant for e in self.vision)})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        """Validate and build; unknown keys (from newer writers) are ignored."""
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{where}: schema_version {version!r}, this convllava-edge reads {SCHEMA_VERSION}")
        try:
            kw = _known(cls, data)
            kw["files"] = tuple(FileRecord(**_known(FileRecord, f)) for f in data["files"])
            kw["vision"] = tuple(VisionEntry(**{**_known(VisionEntry, v), "files": tuple(v["files"]),
                                                "parts": dict(v.get("parts") or {})}) for v in data["vision"])
            kw["llm"] = LlmEntry(**_known(LlmEntry, data["llm"])) if data.get("llm") else None
            manifest = cls(**kw)
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
        manifest._validate(where)
        return manifest

    def _validate(self, where: str) -> None:
        if self.family not in FAMILIES:
            raise BundleError(f"{where}: unknown family {self.family!r} (known: {', '.join(FAMILIES)})")
        if not self.vision:
            raise BundleError(f"{where}: no vision graph")
        listed = {f.path for f in self.files}
        named = [p for v in self.vision for p in (v.graph, *v.files, *v.parts.values())] + \
            ([self.llm.file] if self.llm else [])
        for path in named:
            if path not in listed:
                raise BundleError(f"{where}: {path!r} is used but not listed in files")
        for record in self.files:
            check_relative(record.path, where)
        if self.n_embd <= 0:
            raise BundleError(f"{where}: n_embd must be positive, got {self.n_embd}")


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def check_relative(path: str, where: str) -> None:
    """A manifest path must name a file inside the bundle: relative, no '..', no drive or root."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or ".." in p.parts or ":" in path or p.parts[:1] == (".",):
        raise BundleError(f"{where}: file name {path!r} points outside the bundle")


def resolve_inside(bundle: Path, path: str) -> Path:
    """The file's real location, refusing symbolic links that lead out of the bundle."""
    check_relative(path, str(bundle / MANIFEST_NAME))
    root = bundle.resolve()
    target = (bundle / path).resolve()
    if root != target and root not in target.parents:
        raise BundleError(f"{bundle / path}: symbolic link leads outside the bundle (to {target})")
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(bundle: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read ``bundle/manifest.json``; with ``verify``, check every file's size and SHA-256."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder")
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST_NAME} (not a convllava-edge bundle)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    manifest = Manifest.from_dict(data, str(path))
    for record in manifest.files:
        real = resolve_inside(bundle, record.path)
        if not real.is_file():
            raise BundleError(f"{bundle / record.path}: missing (listed in {MANIFEST_NAME})")
        if verify:
            size = real.stat().st_size
            if size != record.size:
                raise BundleError(f"{bundle / record.path}: size {size} bytes, manifest says {record.size} "
                                  "(altered or truncated)")
            if sha256_file(real) != record.sha256:
                raise BundleError(f"{bundle / record.path}: SHA-256 does not match the manifest (altered)")
    return manifest


def write_manifest(bundle: Path, manifest: Manifest) -> Path:
    path = bundle / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
