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

from .errors import BundleError, ConfigError
from .preprocess import PreprocessConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 20
MAX_N_EMBD = 65536  # 8x Llama-3-70B's 8192: any wider is not a model this runs
MAX_TOKENS_PER_IMAGE = 65536  # ConvLLaVA-1536 has 576; a 16384 px square at stride 64 has 65536
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are a few kB (LLaVA-Mini's carries its chat template)


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
    variant: str  # fp32 | fp16 | int8 | bf16 (the fp32 graph, run in bf16 arithmetic)
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
class LlmHfEntry:
    """The LLM in Hugging Face form (``export --llm-type hf``): a LlamaForCausalLM folder for engines that load
    HF weights (vLLM)."""

    folder: str  # "llm-hf"
    files: tuple[str, ...]  # every file of the folder, each listed (and hashed) in the manifest's files
    dtype: str  # the checkpoint's: bfloat16, float16 or float32
    n_ctx_train: int
    vocab: str | None = None  # llm-vocab.gguf: the vocabulary alone (no tensors), how the vLLM backend tokenizes


@dataclass(frozen=True)
class TokensPerImage:
    """How many LLM positions an image takes: ``rule`` in words; ``square`` for a padded or cropped square image
    (the most any aspect mode gives); ``stride`` the pixels per token side; ``compressed`` LLaVA-Mini's count per
    image or frame. Keys of newer writers are kept in ``extra`` and written back."""

    rule: str = ""
    square: int | None = None
    stride: int | None = None
    compressed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    COUNTS = ("square", "stride", "compressed")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "TokensPerImage":
        _expect(data, dict, f"{where}: tokens_per_image")
        rule = data.get("rule", "")
        _expect(rule, str, f"{where}: tokens_per_image.rule")
        counts = {}
        for key in cls.COUNTS:
            value = data.get(key)
            if value is not None:
                _expect(value, int, f"{where}: tokens_per_image.{key}")
                if not 0 < value <= MAX_TOKENS_PER_IMAGE:
                    raise BundleError(f"{where}: tokens_per_image.{key} must be in 1..{MAX_TOKENS_PER_IMAGE}, got {value}")
            counts[key] = value
        extra = {k: v for k, v in data.items() if k not in ("rule", *cls.COUNTS)}
        return cls(rule=rule, extra=extra, **counts)

    def to_dict(self) -> dict[str, Any]:
        counts = {key: getattr(self, key) for key in self.COUNTS if getattr(self, key) is not None}
        return {**({"rule": self.rule} if self.rule else {}), **counts, **self.extra}


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    family: str  # a name families.family_for knows: convllava, llava-mini
    name: str
    created_with: str  # "convllava-edge 0.1.0"
    files: tuple[FileRecord, ...]
    preprocess: PreprocessConfig  # how images become the graphs' pixels, with the bundle's default aspect mode
    n_embd: int  # width of the image embeddings = the LLM's embedding width
    tokens_per_image: TokensPerImage
    vision: tuple[VisionEntry, ...]  # the first is the default
    tower: dict[str, Any] = field(default_factory=dict)  # depths, hidden_sizes, patch_size, projector (for FLOP counts)
    llm: LlmEntry | None = None
    template: dict[str, Any] | None = None  # prompt.Template.to_dict()
    tokenizer: dict[str, Any] = field(default_factory=dict)  # add_space_prefix, space_after_special (HF "legacy")
    accuracy: dict[str, Any] = field(default_factory=dict)  # figures measured at export
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint name, notes
    llm_hf: LlmHfEntry | None = None

    @property
    def llm_n_ctx_train(self) -> int:
        """The LLM's trained context, from whichever form the bundle holds it in."""
        return (self.llm or self.llm_hf).n_ctx_train

    @property
    def llm_type(self) -> str:
        """The GGUF's type (Q4_K_M, F32, ...), or "hf" for a bundle with its LLM in Hugging Face form only."""
        return self.llm.type if self.llm else "hf"

    def vision_entry(self, variant: str | None = None) -> VisionEntry:
        if variant is None:
            return self.vision[0]
        for entry in self.vision:
            if entry.variant == variant:
                return entry
        raise BundleError(f"bundle {self.name!r} has no {variant} vision graph "
                          f"(it has: {', '.join(e.variant for e in self.vision)})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "preprocess": self.preprocess.to_dict(), "tokens_per_image": self.tokens_per_image.to_dict()}

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
            hf = data.get("llm_hf")
            kw["llm_hf"] = LlmHfEntry(**{**_known(LlmHfEntry, hf), "files": tuple(hf["files"])}) if hf else None
            kw["preprocess"] = PreprocessConfig.from_manifest(data["preprocess"])
            kw["tokens_per_image"] = TokensPerImage.from_dict(data["tokens_per_image"], where)
            manifest = cls(**kw)
            manifest._validate(where)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise BundleError(f"{where}: malformed manifest ({what})") from e
        except ConfigError as e:  # the preprocessing or the template it describes
            raise BundleError(f"{where}: {e}") from e
        return manifest

    def _validate(self, where: str) -> None:
        """Every value the runtime reads, typed and bounded: past this point nothing trusts luck."""
        from .families import family_for
        from .prompt import template_from_dict

        for name in ("family", "name", "created_with"):
            _expect(getattr(self, name), str, f"{where}: {name}")
        for name in ("tower", "tokenizer", "accuracy", "source"):
            _expect(getattr(self, name), dict, f"{where}: {name}")
        _expect(self.n_embd, int, f"{where}: n_embd")
        if not 0 < self.n_embd <= MAX_N_EMBD:
            raise BundleError(f"{where}: n_embd must be in 1..{MAX_N_EMBD}, got {self.n_embd}")
        for record in self.files:
            _expect(record.path, str, f"{where}: a file's path")
            _expect(record.size, int, f"{where}: size of {record.path!r}")
            if not (isinstance(record.sha256, str) and len(record.sha256) == 64
                    and all(c in "0123456789abcdef" for c in record.sha256)) or record.size < 0:
                raise BundleError(f"{where}: {record.path!r} needs a 64-hex sha256 and a size >= 0")
        _expect(self.preprocess, PreprocessConfig, f"{where}: preprocess")  # typed and checked by from_manifest
        _expect(self.tokens_per_image, TokensPerImage, f"{where}: tokens_per_image")
        for entry in self.vision:
            for name in ("variant", "graph", "method"):
                _expect(getattr(entry, name), str, f"{where}: vision {name}")
            for f in (*entry.files, *entry.parts.keys(), *entry.parts.values()):
                _expect(f, str, f"{where}: vision {entry.variant} files")
        if self.llm is not None:
            _expect(self.llm.file, str, f"{where}: llm.file")
            _expect(self.llm.type, str, f"{where}: llm.type")
            _expect(self.llm.tensor_types, dict, f"{where}: llm.tensor_types")
            _expect(self.llm.n_ctx_train, int, f"{where}: llm.n_ctx_train")
        if self.llm_hf is not None:
            for name in ("folder", "dtype"):
                _expect(getattr(self.llm_hf, name), str, f"{where}: llm_hf.{name}")
            _expect(self.llm_hf.n_ctx_train, int, f"{where}: llm_hf.n_ctx_train")
            for f in self.llm_hf.files:
                _expect(f, str, f"{where}: llm_hf files")
                if not f.startswith(self.llm_hf.folder + "/"):
                    raise BundleError(f"{where}: llm_hf file {f!r} is not inside {self.llm_hf.folder!r}")
            if self.llm_hf.vocab is not None:
                _expect(self.llm_hf.vocab, str, f"{where}: llm_hf.vocab")
        if self.template is not None:
            _expect(self.template, dict, f"{where}: template")
            template = template_from_dict(self.template)
            for text in (*template.stop, getattr(template, "answer_header", ""), getattr(template, "bos_token", "")):
                _expect(text, str, f"{where}: template stop strings and headers")
            template.render([("?", None)])  # compiles and renders, in bounded time
        if not self.vision:
            raise BundleError(f"{where}: no vision graph")
        family_for(self.family, where).validate(self, where)
        listed = {f.path for f in self.files}
        named = [p for v in self.vision for p in (v.graph, *v.files, *v.parts.values())] + \
            ([self.llm.file] if self.llm else []) + list(self.llm_hf.files if self.llm_hf else []) + \
            ([self.llm_hf.vocab] if self.llm_hf and self.llm_hf.vocab else [])
        for path in named:
            if path not in listed:
                raise BundleError(f"{where}: {path!r} is used but not listed in files")
        for record in self.files:
            check_relative(record.path, where)
        if self.n_embd <= 0:
            raise BundleError(f"{where}: n_embd must be positive, got {self.n_embd}")


def _expect(value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{what} must be {kind.__name__}, got {type(value).__name__} {str(value)[:40]!r}")


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def check_relative(path: str, where: str) -> None:
    """A manifest path must name a file inside the bundle: relative, no '..', no drive or root."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or ".." in p.parts or ":" in path or p.parts[:1] == (".",):
        raise BundleError(f"{where}: file name {path!r} points outside the bundle")


def resolve_inside(bundle: Path, path: str) -> Path:
    """The file's real location, refusing symbolic links that lead out of the bundle (a bundle in the Hugging Face
    cache, hub.py, may link into its own repo's ``blobs`` folder: that is how the cache stores every file)."""
    check_relative(path, str(bundle / MANIFEST_NAME))
    root = bundle.resolve()
    target = (bundle / path).resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    if not any(r == target or r in target.parents for r in roots):
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
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {size:,} bytes, more than a manifest's {MAX_MANIFEST_BYTES:,}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise BundleError(f"{path}: not a manifest (JSON nested too deep)") from e
    except OSError as e:
        raise BundleError(f"{path}: cannot read: {e.strerror or e}") from e
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
