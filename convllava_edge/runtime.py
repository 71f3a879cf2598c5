"""How a bundle is to run: one frozen ``RuntimeOptions``, built once by whoever starts the work (the CLI's
commands, ``serve``, ``batch`` and its Ray actors, ``load()``) and read by ``Model``.

Before it, these settings travelled as keyword arguments and ``llm=dict(...)`` through six call sites, some
carrying ``vision_url`` and some not. Each field is checked here, once, with the one-line errors the command
line shows; ``Model`` only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError, unknown_choice


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # "auto", "cpu" or "cuda": for the vision graphs and llama.cpp's offload
    threads: int | None = None  # the LLM's decoding, and all the rest unless threads_batch (default: the cores here)
    threads_batch: int | None = None  # the vision graphs' and the prompt's batches apart (serve: every core, while
                                      # each slot decodes on its share)
    vision_type: str | None = None  # a variant the bundle ships (default: its first)
    vision_backend: str | None = None  # "onnxruntime", "openvino", "auto" (None: $CONVLLAVA_EDGE_VISION_BACKEND)
    vision_url: str | None = None  # a Triton server running the graphs (deploy triton)
    llm_backend: str = "llama.cpp"  # or "vllm": a vLLM server at llm_url
    llm_url: str | None = None
    llm_model: str | None = None  # the vLLM server's name for the model, if it serves several
    n_ctx: int | None = None  # positions of the LLM's context (default: its trained context)
    cache: Any = True  # True: the default disk cache; False/None: none; or a cache.DiskCache
    kv_f32: bool = False  # llama.cpp's KV cache in f32 (the parity runs'); default f16
    # vision auto's timing where no record holds its choice: "now" (before the first encode: serve, batch, bench) or
    # "later" (the likely fastest now, the timing in a background process: the one-shot commands; calibrate.py)
    calibrate: str = "now"

    def validate(self) -> "RuntimeOptions":
        from .backends import llm_kind
        from .backends.base import DEVICES
        from .threads import check_threads

        if self.device not in DEVICES:
            raise unknown_choice("device", self.device, DEVICES)
        check_threads(self.threads)
        check_threads(self.threads_batch)
        if self.calibrate not in ("now", "later"):
            raise unknown_choice("calibrate", self.calibrate, ("now", "later"))
        llm_kind(self.llm_backend)  # a registered one (backends/__init__.py), or the one-line list of them
        if self.n_ctx is not None and (isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or self.n_ctx < 1):
            raise ConfigError(f"n_ctx must be a positive integer, got {self.n_ctx!r}")
        return self

    @property
    def batch_threads(self) -> int | None:
        """The vision graphs' and the prompt batches' threads."""
        return self.threads_batch or self.threads

    def with_(self, **changes: Any) -> "RuntimeOptions":
        """These options with ``changes`` (RuntimeOptions' own field names); a ConfigError names any other."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown runtime option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return replace(self, **changes) if changes else self


__all__ = ["RuntimeOptions"]
