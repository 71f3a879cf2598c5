"""Cheap checks of a GGUF file's header, before llama.cpp sees the file.

llama.cpp refuses a malformed GGUF framing with an error, but several metadata values reach a
``GGML_ASSERT`` and abort the whole process (SIGABRT, no Python exception): ``block_count`` outside
1..LLAMA_MAX_LAYERS and unknown ``rope.scaling.type`` (llama-model.cpp, load_hparams), a duplicated
token string (llama-vocab.cpp, ``id_to_token.size() == token_to_id.size()``), an RMS-norm epsilon that
is not ``>= 0`` such as NaN (ggml-cpu ops.cpp, at the first decode), expert counts on a dense model, a
value head size that differs from the key head size (the llama graph). ``validate_gguf`` reads only
the header (key/value pairs, token strings, tensor infos), never the tensor data, and refuses such a
file with one ``BundleError`` line: "<path>: GGUF <what> is <value>, expected <rule>".

Long module: the parser and every rule it enforces stay together, so each rule sits beside the bytes
it reads and the list of what llama.cpp would abort on reads as one list.

The header is parsed here with ``struct`` rather than with ``gguf.GGUFReader`` because the reader
cannot be made safe against crafted counts: it never compares an array's length with the file size
and builds one numpy view per element (measured with the installed gguf 0.19.0: a 60-byte file
declaring a 2,000,000-element uint8 array took 18.6 s and 1.9 GB of memory; the 2**30 elements
gguf.cpp allows would take hours and ~1 TB). It is also slow on honest files (0.15 s for the demo's
512 tokens, so seconds for a 128k-token vocabulary with its merges). Here every count is checked
against the bytes left in the file before it is used, reads are bounded by ``max_bytes_header``, and
the framing rules are gguf.cpp's (so a file that passes also passes ggml's own parser). The format's
constants (magic, value and tensor types, block sizes, key and tensor names) come from gguf-py.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, MODEL_ARCH, MODEL_ARCH_NAMES,
                            MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFValueType, Keys)

from .errors import BundleError

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
# gguf.cpp refuses v1 ("no longer supported") and versions above GGUF_VERSION (3); v2 and v3 share
# the layout read here (64-bit counts and lengths).
SUPPORTED_VERSIONS = (2, 3)
ARCHITECTURES = (MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA],)  # what our exporter writes: "llama"
TOKENIZER_MODELS = ("llama", "gpt2")  # SentencePiece (LLaMA/Vicuna) and byte-level BPE vocabularies
# LLAMA_ROPE_SCALING_TYPES in llama-model.cpp, the list llama.cpp asserts on (gguf-py's RopeScalingType may
# name types a given llama.cpp build does not know)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")

# llama-hparams.h: LLAMA_MAX_LAYERS = 512, and load_hparams GGML_ASSERTs 0 < block_count <= 512 (an abort,
# not an error). The per-layer hparams arrays are sized by it, so no llama.cpp build loads more blocks.
MAX_LAYERS = 512
MAX_EMBD = 65536  # 8x LLaMA-65B's 8192; a larger width is no model our bundles can hold
MAX_CTX = 2**24  # 16M tokens: 16x the longest trained contexts (1M)
# Bounds on what the parse keeps in memory, far above real files and far below a hostile 64 MiB header
# of tiny entries (millions of them):
MAX_VOCAB = 2**20  # 4x the largest vocabularies (Gemma's 262,144 tokens)
MAX_KV_PAIRS = 4096  # real GGUFs carry 20-60 key/value pairs
MAX_TENSORS = 65536  # 512 blocks x 128 tensors; LLaMA-3.1-405B has ~1,140
GGML_MAX_DIMS = 4  # ggml.h; gguf.cpp refuses tensors with more dimensions
GGML_MAX_NAME = 64  # ggml.h; gguf.cpp refuses tensor names of 64 bytes or more (NUL included)
INT64_MAX = 2**63 - 1  # gguf.cpp reads dimensions as int64 and refuses element counts that overflow it
# A default header bound far above real files (LLaMA-3's 128k tokens + 280k merges take ~8 MB) and
# small enough that a hostile file costs at most a 64 MiB read.
DEFAULT_MAX_BYTES_HEADER = 64 * 2**20
CHUNK = 2**20  # first read; the buffer doubles as the parse needs more

# Minimal encoded sizes, to check a declared count against the bytes left before looping over it:
U32, U64 = 4, 8
MIN_KV_BYTES = U64 + 1 + U32 + 1  # key length, a non-empty key, value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = U64 + U32 + U32 + U64  # name length, n_dims, type, offset (empty name, 0 dims)

# The GGUF spec's little-endian scalar encodings (GGUFWriter keeps the same table, privately).
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
SCALAR_STRUCTS = {t: struct.Struct(f) for t, f in SCALAR_FORMATS.items()}
_U64 = struct.Struct("<Q").unpack_from

# The dense llama block, ggml order (ne[0] first, as stored in the file and as gguf-py reports it).
BLOCK_TENSORS = (MODEL_TENSOR.ATTN_NORM, MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V,
                 MODEL_TENSOR.ATTN_OUT, MODEL_TENSOR.FFN_NORM, MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP,
                 MODEL_TENSOR.FFN_DOWN)
BLOCK_NAME = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class GgufSummary:
    """What the header says, once every check has passed."""

    path: Path
    architecture: str  # general.architecture, "llama"
    n_embd: int  # embedding_length: the width image embeddings must have
    n_layers: int  # block_count
    n_vocab: int  # len(tokenizer.ggml.tokens) == token_embd rows
    n_ctx_train: int  # context_length
    n_head: int
    n_head_kv: int
    n_ff: int  # feed_forward_length
    tokenizer_model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (BPE)
    n_tensors: int
    file_size: int  # bytes
    # The GGML type holding most of the blocks' matrix bytes ("Q4_K" in a Q4_K_M file): what llama.cpp's
    # kernels spend their time on, and what native.load_plan chooses settings by.
    weight_type: str = ""


@dataclass(frozen=True)
class _Array:
    """An array value: its element type and length (element values are kept only where needed)."""

    type: GGUFValueType
    n: int


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order, ne[0] first
    type: GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


def _where(path) -> str:
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)  # keeps the message one line


def _printable(text: str, limit: int = 120) -> str:
    """Names and values from the file, escaped and cut so the message stays one short line."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Header:
    """A bounded reader over the file's first bytes: every read is checked against the file size and
    ``limit`` before it happens, so a crafted length fails here instead of allocating or looping."""

    def __init__(self, f, path: Path, file_size: int, limit: int):
        self.f, self.path, self.file_size, self.limit = f, path, file_size, limit
        self.where = _where(path)
        self.buf = b""  # bytes, not bytearray: slices are then the values, copied once
        self.pos = 0

    def fail(self, what: str, value, rule: str) -> BundleError:
        return BundleError(f"{self.where}: GGUF {_printable(what)} is {_printable(str(value))}, expected {rule}")

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end <= len(self.buf):
            return
        if end > self.file_size:
            raise self.fail(f"{what} at byte {self.pos}", f"{n} bytes long",
                            f"at most {self.file_size - self.pos} (the file ends at byte {self.file_size}: truncated)")
        if end > self.limit:
            raise self._too_long(end, what)
        want = min(max(end, 2 * len(self.buf), CHUNK), self.file_size, self.limit)
        self.f.seek(len(self.buf))
        chunk = self.f.read(want - len(self.buf))
        self.buf += chunk  # the buffer at least doubles, so the copies add up to O(header size)
        if len(self.buf) < end:  # the file shrank while being read
            raise self.fail(f"{what} at byte {self.pos}", f"{n} bytes long",
                            f"at most {len(self.buf) - self.pos} (the file ended early)")

    def count(self, n: int, min_bytes: int, what: str, most: int | None = None) -> int:
        """A declared element count that must fit in the bytes left (and be at most ``most``)."""
        if most is not None and n > most:
            raise self.fail(what, n, f"at most {most}")
        left = max(self.file_size - self.pos, 0)
        if n > left // min_bytes:
            raise self.fail(what, n, f"at most {left // min_bytes} (each takes >= {min_bytes} bytes and "
                                     f"{left} bytes are left in the file)")
        if self.pos + n * min_bytes > self.limit:
            raise self._too_long(self.pos + n * min_bytes, what)
        return n

    def _too_long(self, end: int, what: str) -> BundleError:
        return self.fail("header size", f"more than {self.limit} bytes",
                         f"at most max_bytes_header={self.limit} (needed {end} bytes at {what})")

    def scalar(self, vtype: GGUFValueType, what: str):
        s = SCALAR_STRUCTS[vtype]
        self.need(s.size, what)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> bytes:
        n = self.count(self.u64(f"{what} length"), 1, f"{what} length")
        self.need(n, what)
        value = self.buf[self.pos:self.pos + n]
        self.pos += n
        return value

    def strings(self, n: int, what: str, keep: bool) -> list[bytes] | None:
        """``n`` strings in one tight loop (a vocabulary and its merges are 100k-400k strings): the
        buffer is grown only when a string runs past it, so the common case is one unpack and one add."""
        out: list[bytes] | None = [] if keep else None
        buf, pos = self.buf, self.pos
        size = len(buf)
        for i in range(n):
            if pos + U64 > size:
                self.pos = pos
                self.need(U64, f"{what}[{i}] length")
                buf = self.buf
                size = len(buf)
            end = pos + U64 + _U64(buf, pos)[0]
            if end > size:
                self.pos = pos + U64
                self.count(end - self.pos, 1, f"{what}[{i}] length")
                self.need(end - self.pos, f"{what}[{i}]")
                buf = self.buf
                size = len(buf)
            if out is not None:
                out.append(buf[pos + U64:end])
            pos = end
        self.pos = pos
        return out

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError as e:
            raise self.fail(what, raw, f"one of {', '.join(f'{t.value} ({t.name})' for t in GGUFValueType)}") from e


def _read_value(h: _Header, key: str, keep_strings: int | None) -> tuple[GGUFValueType, object]:
    """(type, value); a string array's value is its strings when ``keep_strings`` (their most), else
    an ``_Array``."""
    what = f"value of {key}"
    vtype = h.value_type(f"type of {key}")
    if vtype == GGUFValueType.STRING:
        return vtype, h.string(what)
    if vtype != GGUFValueType.ARRAY:
        return vtype, h.scalar(vtype, what)
    etype = h.value_type(f"array element type of {key}")
    if etype == GGUFValueType.ARRAY:  # gguf.cpp refuses nested arrays too
        raise h.fail(f"array element type of {key}", "ARRAY", "a scalar or string type")
    if etype == GGUFValueType.STRING:
        n = h.count(h.u64(f"array length of {key}"), U64, f"array length of {key}", keep_strings)
        values = h.strings(n, key, keep_strings is not None)
        return vtype, (_Array(etype, n) if values is None else values)
    size = SCALAR_STRUCTS[etype].size
    n = h.count(h.u64(f"array length of {key}"), size, f"array length of {key}")
    h.skip(n * size, what)
    return vtype, _Array(etype, n)


def _read_kv(h: _Header, n_kv: int, keep: dict[str, int]) -> dict[str, tuple[GGUFValueType, object]]:
    """The pairs by key; string arrays are kept only for the keys in ``keep`` (with their most elements)."""
    kv: dict[str, tuple[GGUFValueType, object]] = {}
    for i in range(n_kv):
        raw_key = h.string(f"key {i}")
        if not raw_key:  # gguf.cpp refuses empty keys
            raise h.fail(f"key {i}", "empty", "a non-empty name")
        key = raw_key.decode("utf-8", "backslashreplace")
        if key in kv:
            raise h.fail(f"key {i}", _show(key), "unique (it appears twice)")
        kv[key] = _read_value(h, key, keep_strings=keep.get(key))
    return kv


def _read_tensor_infos(h: _Header, n_tensors: int) -> list[_TensorInfo]:
    infos: list[_TensorInfo] = []
    seen: set[bytes] = set()
    for i in range(n_tensors):
        raw = h.string(f"tensor {i} name")
        name = raw.decode("utf-8", "backslashreplace")
        if len(raw) >= GGML_MAX_NAME:
            raise h.fail(f"tensor {i} name length", len(raw), f"< {GGML_MAX_NAME} bytes (GGML_MAX_NAME)")
        if raw in seen:
            raise h.fail(f"tensor {i} name", _show(name), "unique (it appears twice)")
        seen.add(raw)
        n_dims = h.u32(f"tensor {name} n_dims")
        if n_dims > GGML_MAX_DIMS:
            raise h.fail(f"tensor {name} n_dims", n_dims, f"at most {GGML_MAX_DIMS}")
        shape = tuple(h.u64(f"tensor {name} dim {d}") for d in range(n_dims))
        n_elements = 1
        for d in shape:
            n_elements *= d
        if any(d > INT64_MAX for d in shape) or n_elements > INT64_MAX:
            raise h.fail(f"tensor {name} shape", list(shape), f"dims whose product is at most {INT64_MAX}")
        raw_type = h.u32(f"tensor {name} type")
        try:
            ttype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError) as e:
            raise h.fail(f"tensor {name} type", raw_type,
                         f"a GGML type known to gguf-py ({', '.join(t.name for t in GGML_QUANT_SIZES)})") from e
        row = shape[0] if shape else 1
        if row % block:
            raise h.fail(f"tensor {name} row width", row, f"a multiple of {ttype.name}'s block size {block}")
        offset = h.u64(f"tensor {name} offset")
        infos.append(_TensorInfo(name, shape, ttype, offset, n_elements // block * type_size))
    return infos


def _check_layout(h: _Header, infos: list[_TensorInfo], alignment: int) -> None:
    """Every tensor's bytes lie inside the file, aligned, back to back, and no two overlap."""
    data_start = -(-h.pos // alignment) * alignment  # the data section starts at the next aligned byte
    data_size = h.file_size - data_start
    for t in infos:
        if t.offset % alignment:
            raise h.fail(f"tensor {t.name} offset", t.offset, f"a multiple of the alignment {alignment}")
        if t.offset + t.n_bytes > data_size:
            raise h.fail(f"tensor {t.name} end", f"byte {data_start + t.offset + t.n_bytes}",
                         f"at most {h.file_size} (the file size; {t.type.name} {list(t.shape)} takes {t.n_bytes} "
                         f"bytes at data offset {t.offset})")
    ordered = sorted(infos, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.n_bytes:
            raise h.fail(f"tensor {b.name} offset", b.offset,
                         f">= {a.offset + a.n_bytes} (the end of {a.name}: tensors must not overlap)")
    # gguf.cpp also refuses gaps and reordering: each offset must be the padded sum of the tensors before it.
    expected = 0
    for t in infos:
        if t.offset != expected:
            raise h.fail(f"tensor {t.name} offset", t.offset,
                         f"{expected} (tensors are stored back to back in header order, each padded to {alignment})")
        expected += -(-t.n_bytes // alignment) * alignment


class _Metadata:
    """Typed access to the key/value pairs, failing with the key, the value and the rule. The types
    asked for are the ones llama.cpp's loader reads (``get_key`` refuses any other GGUF type)."""

    def __init__(self, h: _Header, kv: dict[str, tuple[GGUFValueType, object]], arch: str = ""):
        self.h, self.kv, self.arch = h, kv, arch

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def _get(self, template: str, vtype: GGUFValueType, rule: str, required: bool):
        key = self.key(template)
        if key not in self.kv:
            if required:
                raise self.h.fail(key, "missing", rule)
            return key, None
        got, value = self.kv[key]
        if got != vtype:
            raise self.h.fail(f"{key} type", got.name, vtype.name)
        return key, value

    def int(self, template: str, lo: int, hi: int, required: bool = True, default: int | None = None,
            vtype: GGUFValueType = GGUFValueType.UINT32) -> int | None:
        key, value = self._get(template, vtype, f"an integer in {lo}..{hi}", required)
        if value is None:
            return default
        if not lo <= value <= hi:
            raise self.h.fail(key, value, f"{lo}..{hi}")
        return value

    def float(self, template: str, rule: str, ok, required: bool = True) -> float | None:
        key, value = self._get(template, GGUFValueType.FLOAT32, f"a float {rule}", required)
        if value is not None and not ok(value):
            raise self.h.fail(key, value, rule)
        return value

    def text(self, template: str, choices, required: bool = True) -> str | None:
        rule = f"one of {', '.join(map(repr, choices))}"
        key, value = self._get(template, GGUFValueType.STRING, rule, required)
        if value is None:
            return None
        decoded = value.decode("utf-8", "backslashreplace")
        if decoded not in choices:
            raise self.h.fail(key, _show(decoded), rule)
        return decoded

    def array(self, template: str, required: bool = False) -> list[bytes] | _Array | None:
        return self._get(template, GGUFValueType.ARRAY, "an array", required)[1]


def _check_vocab(m: _Metadata) -> tuple[str, int]:
    fail, T = m.h.fail, Keys.Tokenizer
    model = m.text(T.MODEL, TOKENIZER_MODELS)
    tokens = m.array(T.LIST, required=True)
    if not isinstance(tokens, list):
        raise fail(f"{T.LIST} element type", tokens.type.name, "STRING")
    n_vocab = len(tokens)
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise fail(f"{T.LIST} length", n_vocab, f"1..{MAX_VOCAB}")
    # llama-vocab.cpp renames empty tokens before building its string -> id map, then asserts the map
    # has one entry per token; compare what it compares.
    seen: dict[bytes, int] = {}
    for i, tok in enumerate(tokens):
        tok = tok or f"[EMPTY_{i}]".encode()
        first = seen.setdefault(tok, i)
        if first != i:
            raise fail(f"{T.LIST}[{i}]", _show(tok.decode('utf-8', 'backslashreplace')),
                       f"unique (token {first} is the same string; llama.cpp aborts on duplicates)")
    # llama-vocab.cpp reads scores as float32 or int32 and token types as int32, one per token
    for key, types in ((T.SCORES, (GGUFValueType.FLOAT32, GGUFValueType.INT32)),
                       (T.TOKEN_TYPE, (GGUFValueType.INT32,))):
        arr = m.array(key)
        if arr is None:
            continue
        if isinstance(arr, list) or arr.type not in types:
            shown = "STRING" if isinstance(arr, list) else arr.type.name
            raise fail(f"{key} element type", shown, " or ".join(t.name for t in types))
        if arr.n != n_vocab:
            raise fail(f"{key} length", arr.n, f"{n_vocab} (the number of tokens)")
    if model == "gpt2":
        merges = m.array(T.MERGES)
        if merges is None:
            raise fail(T.MERGES, "missing", "an array of strings (a gpt2 BPE vocabulary needs its merges)")
        if merges.type != GGUFValueType.STRING:
            raise fail(f"{T.MERGES} element type", merges.type.name, "STRING")
    for key in (T.BOS_ID, T.EOS_ID, T.UNK_ID, T.PAD_ID):
        m.int(key, 0, n_vocab - 1, required=False)
    return model, n_vocab


def _check_tensors(m: _Metadata, infos: list[_TensorInfo], n_vocab: int, n_embd: int, n_layers: int,
                   n_head: int, n_head_kv: int, head_dim: int, n_ff: int) -> None:
    fail = m.h.fail
    by_name = {t.name: t for t in infos}
    q_width, kv_width = head_dim * n_head, head_dim * n_head_kv

    def expect(name: str, shape: tuple[int, ...], required: bool = True) -> None:
        t = by_name.get(name)
        if t is None:
            if required:
                raise fail(f"tensor {name}", "missing", f"a tensor of shape {list(shape)} (ggml order)")
            return
        # ggml compares all GGML_MAX_DIMS dimensions, absent ones being 1
        pad = lambda s: tuple(s) + (1,) * (GGML_MAX_DIMS - len(s))  # noqa: E731
        if pad(t.shape) != pad(shape):
            raise fail(f"tensor {name} shape", list(t.shape), f"{list(shape)} (ggml order: ne[0] first)")

    def weight(tensor: MODEL_TENSOR, bid: int | None = None) -> str:
        return TENSOR_NAMES[tensor].format(bid=bid) + ".weight"

    expect(weight(MODEL_TENSOR.TOKEN_EMBD), (n_embd, n_vocab))
    expect(weight(MODEL_TENSOR.OUTPUT_NORM), (n_embd,))
    expect(weight(MODEL_TENSOR.OUTPUT), (n_embd, n_vocab), required=False)
    shapes = {MODEL_TENSOR.ATTN_NORM: (n_embd,), MODEL_TENSOR.ATTN_Q: (n_embd, q_width),
              MODEL_TENSOR.ATTN_K: (n_embd, kv_width), MODEL_TENSOR.ATTN_V: (n_embd, kv_width),
              MODEL_TENSOR.ATTN_OUT: (q_width, n_embd), MODEL_TENSOR.FFN_NORM: (n_embd,),
              MODEL_TENSOR.FFN_GATE: (n_embd, n_ff), MODEL_TENSOR.FFN_UP: (n_embd, n_ff),
              MODEL_TENSOR.FFN_DOWN: (n_ff, n_embd)}
    for bid in range(n_layers):
        for tensor in BLOCK_TENSORS:
            expect(weight(tensor, bid), shapes[tensor])
    for t in infos:
        match = BLOCK_NAME.match(t.name)
        if match and int(match.group(1)) >= n_layers:
            raise fail(f"tensor {t.name} block index", int(match.group(1)),
                       f"< {n_layers} ({m.key(Keys.LLM.BLOCK_COUNT)})")


def _check_llama(m: _Metadata, infos: list[_TensorInfo], tensors: bool = True) -> GgufSummary:
    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    fail = m.h.fail
    n_ctx = m.int(L.CONTEXT_LENGTH, 1, MAX_CTX)
    n_embd = m.int(L.EMBEDDING_LENGTH, 1, MAX_EMBD)
    n_layers = m.int(L.BLOCK_COUNT, 1, MAX_LAYERS)
    n_ff = m.int(L.FEED_FORWARD_LENGTH, 1, 2**32 - 1)
    n_head = m.int(A.HEAD_COUNT, 1, n_embd)
    n_head_kv = m.int(A.HEAD_COUNT_KV, 1, n_head, required=False, default=n_head)
    if n_head % n_head_kv:
        raise fail(m.key(A.HEAD_COUNT_KV), n_head_kv, f"a divisor of {m.key(A.HEAD_COUNT)} = {n_head}")
    # llama.cpp's head size is key_length when present, else n_embd / n_head (an integer division
    # that would silently drop columns); the llama graph asserts value size == key size == n_rot.
    head_dim = m.int(A.KEY_LENGTH, 1, MAX_EMBD, required=False)
    if head_dim is None:
        if n_embd % n_head:
            raise fail(m.key(L.EMBEDDING_LENGTH), n_embd, f"a multiple of {m.key(A.HEAD_COUNT)} = {n_head}")
        head_dim = n_embd // n_head
    for key in (A.VALUE_LENGTH, R.DIMENSION_COUNT):
        m.int(key, head_dim, head_dim, required=False)
    m.float(A.LAYERNORM_RMS_EPS, "in (0, 1)", lambda v: 0 < v < 1)  # NaN fails both comparisons
    m.float(R.FREQ_BASE, "finite and > 0", lambda v: math.isfinite(v) and v > 0, required=False)
    m.float(R.SCALING_FACTOR, "finite and >= 0", lambda v: math.isfinite(v) and v >= 0, required=False)
    m.text(R.SCALING_TYPE, ROPE_SCALING_TYPES, required=False)
    # Our bundles hold dense models; load_hparams asserts the expert counts agree with each other.
    for key in (L.EXPERT_COUNT, L.EXPERT_USED_COUNT, L.EXPERT_GROUP_COUNT):
        m.int(key, 0, 0, required=False)
    tokenizer_model, n_vocab = _check_vocab(m)
    if tensors:
        _check_tensors(m, infos, n_vocab, n_embd, n_layers, n_head, n_head_kv, head_dim, n_ff)
    weight_bytes: dict[str, int] = {}
    for info in infos:
        if len(info.shape) == 2 and BLOCK_NAME.match(info.name):
            weight_bytes[info.type.name] = weight_bytes.get(info.type.name, 0) + info.n_bytes
    return GgufSummary(m.h.path, m.arch, n_embd, n_layers, n_vocab, n_ctx, n_head, n_head_kv, n_ff,
                       tokenizer_model, len(infos), m.h.file_size,
                       max(weight_bytes, key=weight_bytes.get) if weight_bytes else "")


def validate_gguf(path: str | os.PathLike, *, max_bytes_header: int = DEFAULT_MAX_BYTES_HEADER,
                  tensors: bool = True) -> GgufSummary:
    """Check a GGUF's header (framing, llama hparams, vocabulary, tensor shapes and layout) without
    reading tensor data; return its summary or raise ``BundleError`` naming the file, the value and
    the rule. Time and memory are linear in the header's size and bounded by ``max_bytes_header``.
    ``tensors=False``: a vocabulary-only file (llama.cpp's ``vocab_only`` load reads the hparams and the
    vocabulary, no tensor), which must then hold no tensor at all."""
    where = _where(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused as not a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BundleError(f"{where}: cannot open the GGUF file ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise BundleError(f"{where}: GGUF file is {kind}, expected a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        h = _Header(f, Path(os.fsdecode(path)), st.st_size, max_bytes_header)
        try:
            return _validate(h, tensors)
        except OSError as e:
            raise BundleError(f"{where}: cannot read the GGUF file ({e.strerror or e})") from e


def _validate(h: _Header, tensors: bool = True) -> GgufSummary:
    h.need(4, "magic")
    magic = h.buf[:4]
    if magic != MAGIC:
        raise h.fail("magic", _show(magic), f"{MAGIC!r} (not a GGUF file)")
    h.pos = 4
    version = h.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file? llama.cpp reads little-endian)" if version and version & 0xFFFF == 0 else ""
        raise h.fail("version", version, f"one of {', '.join(map(str, SUPPORTED_VERSIONS))}{hint}")
    n_tensors = h.count(h.u64("tensor count"), MIN_TENSOR_INFO_BYTES, "tensor count", MAX_TENSORS)
    n_kv = h.count(h.u64("key/value count"), MIN_KV_BYTES, "key/value count", MAX_KV_PAIRS)
    kv = _read_kv(h, n_kv, keep={Keys.Tokenizer.LIST: MAX_VOCAB})
    h.count(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor count")  # again, in what the pairs left
    infos = _read_tensor_infos(h, n_tensors)

    m = _Metadata(h, kv)
    # gguf.cpp: general.alignment, when present, is a uint32 power of two
    alignment = m.int(Keys.General.ALIGNMENT, 1, 2**31, required=False, default=GGUF_DEFAULT_ALIGNMENT)
    if alignment & (alignment - 1):
        raise h.fail(Keys.General.ALIGNMENT, alignment, "a power of two")
    _check_layout(h, infos, alignment)
    m.arch = m.text(Keys.General.ARCHITECTURE, ARCHITECTURES)
    if not tensors and infos:
        raise h.fail("tensor count", len(infos), "0 (a vocabulary-only file)")
    return _check_llama(m, infos, tensors)
