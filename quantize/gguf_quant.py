"""GGUF F32/F16/BF16 -> k-quants and legacy quants with llama.cpp's own quantizer.

llama.cpp changes a tensor's type when its rows do not fit the type's block (k-quants need rows
that are multiples of 256, Q4_0/Q8_0 of 32): Q4_K becomes Q5_0, Q5_K Q5_1, Q6_K Q8_0, and F16 when
even 32 does not divide. It says so only in its log, and for output.weight not even there. So the
written file is the witness: every 2-D tensor outside the requested type family is reported as a
fallback, with llama.cpp's own reason when its log gave one. The log's per-tensor lines also drive
the progress display.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, ExportError
from ..backends.llm_llamacpp import llama_log

DEFAULT_QUANT = "Q4_K_M"
# --llm-type -> llama_ftype (llama.h). F16/F32 need no quantizer: they are written directly.
QUANT_FTYPES = {"Q4_K_M": 15, "Q4_0": 2, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}
# The block types each file type is made of when every row fits (llama.cpp's llama_tensor_get_type
# mixes in Q6_K for output.weight and some attn_v/ffn_down rows of the _M types).
INTENDED_TYPES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"},
                  "Q4_0": {"Q4_0", "Q6_K"}, "Q8_0": {"Q8_0"}}
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# llama.cpp 0c1e570 (llama-cpp-python 0.3.36):
#   "warning: blk.0.attn_q.weight - ncols 384 not divisible by 256 (required for type q4_K) -> falling back to q5_0"
_FALLBACK = re.compile(r"(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\S+)\)"
                       r" -> falling back to\s+(\S+)")

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Fallback:
    tensor: str
    wanted: str  # the GGML type llama.cpp meant to use
    used: str  # what it wrote instead
    reason: str  # "rows of 384 are not a multiple of 256"


@dataclass
class QuantReport:
    requested: str
    path: Path
    size: int
    tensor_types: dict[str, int]  # GGML type name -> count of tensors, read back from the file
    fallbacks: list[Fallback] = field(default_factory=list)

    def warning(self) -> str | None:
        if not self.fallbacks:
            return None
        used = Counter(f"{f.wanted}->{f.used}" for f in self.fallbacks)
        example = self.fallbacks[0]
        return (f"llama.cpp did not use {self.requested} for {len(self.fallbacks)} tensors "
                f"({', '.join(f'{k} x{n}' for k, n in used.items())}), e.g. {example.tensor}: {example.reason}. "
                "Rows must be multiples of 256 for k-quants and 32 for Q4_0/Q8_0.")


def quantize_gguf(src: Path, dst: Path, quant: str = DEFAULT_QUANT, threads: int | None = None,
                  progress: Progress = lambda *a: None) -> QuantReport:
    import llama_cpp

    if quant not in QUANT_FTYPES:
        raise ConfigError(f"unknown quantization {quant!r} (known: {', '.join(QUANT_FTYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = threads or 0  # 0: llama.cpp uses every hardware thread
    reasons: dict[str, tuple[str, str]] = {}  # tensor -> (wanted type, reason), from llama.cpp's log

    def on_line(line: str) -> None:
        if m := _PROGRESS.search(line):
            progress(int(m.group(1)), int(m.group(2)), m.group(3))
        elif m := _FALLBACK.search(line):
            reasons[m.group(1)] = (m.group(4).upper(), f"rows of {m.group(2)} are not a multiple of {m.group(3)}")

    with llama_log(on_line):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {src} to {quant} (llama_model_quantize returned {rc})")
    types, fallbacks = _read_back(dst, quant, reasons)
    return QuantReport(requested=quant, path=dst, size=dst.stat().st_size, tensor_types=dict(types), fallbacks=fallbacks)


def _read_back(path: Path, quant: str, reasons: dict[str, tuple[str, str]]) -> tuple[Counter, list[Fallback]]:
    """Tensor types in the written file, and every 2-D tensor not stored in the requested family."""
    import gguf

    types, fallbacks = Counter(), []
    for t in gguf.GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        types[kind] += 1
        if len(t.shape) >= 2 and kind not in INTENDED_TYPES[quant]:
            rows = int(t.shape[0])  # GGUF order: ne0, the row width
            wanted, reason = reasons.get(t.name, (f"a {quant} type", f"rows of {rows} are not a multiple of 256"
                                                  if rows % 256 else "llama.cpp's own choice"))
            fallbacks.append(Fallback(t.name, wanted, kind, reason))
    return types, fallbacks


def tensor_types(path: Path) -> Counter:
    """GGML type name -> number of tensors of that type in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return Counter(t.tensor_type.name for t in reader.tensors)
