"""Backends, by the name a user gives: the registries of vision backends (what runs a bundle's graphs) and of LLM
backends (what runs its LLM), as families/ is the registry of model families.

Each backend is a class that declares its name, what it runs (precisions, devices; the form of the LLM's weights),
where it runs (here, or a server elsewhere), what identifies its results for the caches, and how it opens. Built
in: ``onnxruntime``, ``openvino`` and ``triton`` (vision), ``llama.cpp`` and ``vllm`` (LLM), one class each below
with its module beside. Another registers itself with ``register_vision`` / ``register_llm`` (a plugin, a test).
Nothing outside this package compares a backend's name: tools/layout.py checks it, as it does for families.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BundleError, ConfigError, unknown_choice
from .base import DEVICES, LlmBackend, LlmCapabilities, SamplingOptions, Step, VisionBackend

if TYPE_CHECKING:  # runtime.RuntimeOptions, which imports this package, is named as a string only
    from ..manifest import Manifest, VisionEntry


# -- vision backends --------------------------------------------------------------------------------------------
class VisionKind:
    """A vision backend: ``name``; ``precisions`` it computes in; ``local``: it runs here (auto times it; else it is
    a server asked for by URL, ``--vision-url``); ``reference``: its fp32 results are the ones every cache entry is
    keyed against (others add their name and precision to the key)."""

    name = ""
    precisions: tuple[str, ...] = ("fp32",)
    local = True
    reference = False

    def installed(self) -> bool:
        return True

    def runs_on(self, device: str) -> bool:
        """Whether it runs graphs for ``device`` ("auto", "cpu", "cuda") as asked."""
        return True

    def can_run(self, precision: str, device: str = "auto") -> bool:
        """A cheap test, no graph opened: this precision, on this device, installed here."""
        return precision in self.precisions and self.installed() and self.runs_on(device)

    def identity(self, precision: str) -> str:
        """What the results' cache key adds for this backend: nothing for the reference in fp32."""
        return "" if self.reference and precision == "fp32" else f"|{self.name}|{precision}"

    def open(self, device: str, threads: int | None, precision: str, cache_dir=None) -> VisionBackend:
        raise NotImplementedError

    def open_remote(self, bundle: Path, manifest: "Manifest", entry: "VisionEntry", url: str) -> VisionBackend:
        """A server's backend for ``entry``'s graphs (kinds that are not ``local``)."""
        raise ConfigError(f"the {self.name} vision backend runs here: it takes no URL")


class OnnxRuntimeVision(VisionKind):
    name, reference = "onnxruntime", True

    def open(self, device, threads, precision, cache_dir=None):
        if precision not in self.precisions:
            raise ConfigError(f"ONNX Runtime has no {precision} CPU kernels for these graphs: use --vision-backend "
                              "openvino or another vision type")
        from .vision_ort import OrtBackend

        return OrtBackend(device, threads, cache_dir)


class OpenVinoVision(VisionKind):
    name, precisions = "openvino", ("fp32", "bf16")

    def installed(self) -> bool:
        from .vision_openvino import openvino_available

        return openvino_available()

    def runs_on(self, device: str) -> bool:
        return device != "cuda" and not _gpu_visible(device)  # CPU only: where a GPU is, ONNX Runtime uses it

    def can_run(self, precision: str, device: str = "auto") -> bool:
        return super().can_run(precision, device) and (precision != "bf16" or cpu_has_bf16())

    def open(self, device, threads, precision, cache_dir=None):
        from .vision_openvino import OpenVinoBackend

        return OpenVinoBackend(device, threads, precision)


class TritonVision(VisionKind):
    """A Triton server running the graphs ``deploy triton`` put there: asked for by its URL, never timed by auto."""

    name, local = "triton", False

    def can_run(self, precision: str, device: str = "auto") -> bool:
        return False  # not a candidate here: the server runs what it was given

    def open(self, device, threads, precision, cache_dir=None):
        raise ConfigError("the triton vision backend is a server: give its address with --vision-url")

    def open_remote(self, bundle, manifest, entry, url):
        from .vision_triton import open_triton

        return open_triton(bundle, manifest, entry, url)


_VISION: dict[str, VisionKind] = {}


def register_vision(kind: VisionKind) -> VisionKind:
    """Make ``kind`` known by its name (replacing one of the same name)."""
    if not kind.name:
        raise ValueError(f"{type(kind).__name__}: a vision backend needs a name")
    _VISION[kind.name] = kind
    return kind


def unregister_vision(name: str) -> None:
    _VISION.pop(name, None)


def vision_kind(name: str) -> VisionKind:
    if name not in _VISION:  # the ones --vision-backend takes; a server's is named by --vision-url
        raise unknown_choice("vision backend", name, tuple(k.name for k in vision_kinds()))
    return _VISION[name]


def vision_kinds(local: bool | None = True) -> tuple[VisionKind, ...]:
    """The registered vision backends, in registration order (``local``: only those that run here; None: all)."""
    return tuple(k for k in _VISION.values() if local is None or k.local == local)


def remote_vision_kind() -> VisionKind:
    """The backend a ``--vision-url`` names (a server's)."""
    kinds = vision_kinds(local=False)
    if not kinds:
        raise ConfigError("no vision backend runs graphs on a server: --vision-url cannot be used")
    return kinds[0]


def open_vision_backend(device: str = "auto", threads: int | None = None, kind: str = "onnxruntime",
                        cache_dir: str | os.PathLike | None = None, precision: str = "fp32") -> VisionBackend:
    """``precision``: the arithmetic the graphs run in, "fp32" or "bf16" (a bundle's bf16 vision type).
    fp32 means fp32 on every backend; bf16 where the backend has it, else a one-line refusal."""
    if device not in DEVICES:
        raise unknown_choice("device", device, DEVICES)
    return vision_kind(kind).open(device, threads, precision, cache_dir)


def cpu_has_bf16() -> bool:
    from ..machine import cpu_info

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


def _gpu_visible(device: str) -> bool:
    if device == "cpu":
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# -- LLM backends -----------------------------------------------------------------------------------------------
class LlmKind:
    """An LLM backend: ``name``; ``shares_cores``: it computes on this machine's cores, which ``serve`` shares out
    among its slots (a server backend has its own); how it checks that a bundle holds weights it runs, what
    identifies those weights (the KV states' cache key), and how it opens on a bundle."""

    name = ""
    shares_cores = True
    runs = ""  # what it runs, in words
    def check(self, bundle: Path, manifest: "Manifest") -> None:
        """BundleError unless the bundle holds the LLM in a form this backend runs."""

    def identity(self, manifest: "Manifest") -> str:
        raise NotImplementedError

    def weights(self, manifest: "Manifest", llm: LlmBackend) -> str:
        """What it runs, in a few words (bench's report): the GGUF's type, the HF weights and where."""
        return ""

    def open(self, bundle: Path, manifest: "Manifest", options: "RuntimeOptions", n_ctx: int | None = None,
             n_ctx_max: int | None = None, sha256: str | None = None) -> LlmBackend:
        raise NotImplementedError


class LlamaCpp(LlmKind):
    """The bundle's GGUF, in this process."""

    name, runs = "llama.cpp", "a GGUF file here"

    def check(self, bundle, manifest):
        if manifest.llm is None and manifest.llm_hf is not None:
            raise BundleError(f"{bundle}: the bundle holds its LLM in Hugging Face form only "
                              f"({manifest.llm_hf.folder}/), which llama.cpp cannot run: use --llm-backend vllm "
                              "--llm-url URL, or export it with a GGUF --llm-type too (e.g. --llm-type Q4_K_M)")

    def identity(self, manifest):
        return next(f.sha256 for f in manifest.files if f.path == manifest.llm.file)

    def weights(self, manifest, llm):
        return manifest.llm.type

    def open(self, bundle, manifest, options, n_ctx=None, n_ctx_max=None, sha256=None):
        from ..manifest import resolve_inside

        return open_llm(resolve_inside(bundle, manifest.llm.file), options.device, threads=options.threads,
                        kv_f32=options.kv_f32, n_ctx=n_ctx, n_ctx_max=n_ctx_max, sha256=sha256,
                        **({"threads_batch": options.threads_batch} if options.threads_batch else {}))


class Vllm(LlmKind):
    """A vLLM server generating from the bundle's llm-hf/ weights (prompt embeddings: llm_vllm.py)."""

    name, shares_cores, runs = "vllm", False, "a bundle's llm-hf/ on a vLLM server"

    def check(self, bundle, manifest):
        if manifest.llm_hf is None:
            raise BundleError(f"{bundle}: the vllm backend runs the LLM in Hugging Face form (export --llm-type hf), "
                              "which this bundle does not hold")

    def identity(self, manifest):
        return "+".join(f.sha256 for f in manifest.files
                        if f.path in manifest.llm_hf.files and f.path.endswith(".safetensors"))

    def weights(self, manifest, llm):
        return f"hf ({manifest.llm_hf.dtype}) on {llm.where}"

    def open(self, bundle, manifest, options, n_ctx=None, n_ctx_max=None, sha256=None):
        return open_vllm(bundle, manifest, options.llm_url, options.llm_model)  # the server's context, not ours


_LLM: dict[str, LlmKind] = {}


def register_llm(kind: LlmKind) -> LlmKind:
    if not kind.name:
        raise ValueError(f"{type(kind).__name__}: an LLM backend needs a name")
    _LLM[kind.name] = kind
    return kind


def unregister_llm(name: str) -> None:
    _LLM.pop(name, None)


def llm_kind(name: str) -> LlmKind:
    if name not in _LLM:
        raise unknown_choice("LLM backend", name, tuple(_LLM))
    return _LLM[name]


def llm_kinds() -> tuple[LlmKind, ...]:
    return tuple(_LLM.values())


def open_llm(path: str | os.PathLike, device: str = "auto", kind: str = "llama.cpp", **options) -> LlmBackend:
    """llama.cpp on a GGUF file; ``options`` are LlamaCppBackend's own."""
    if device not in DEVICES:
        raise unknown_choice("device", device, DEVICES)
    chosen = llm_kind(kind)
    if not isinstance(chosen, LlamaCpp):
        raise ConfigError(f"the {kind} LLM backend runs {chosen.runs}, not a GGUF file: open it on a bundle "
                          f"(llm_kind({kind!r}).open, or --llm-backend {kind} --llm-url URL)")
    from .llm_llamacpp import LlamaCppBackend, gpu_layers

    return LlamaCppBackend(path, n_gpu_layers=gpu_layers(device), **options)


def open_vllm(bundle, manifest, url: str | None, model: str | None = None) -> LlmBackend:
    """A running vLLM server as the bundle's LLM (its llm-hf/ weights, prompt embeddings: llm_vllm.py)."""
    if not url:
        raise ConfigError("--llm-backend vllm needs --llm-url URL: the vLLM server (docs/scale-out.md)")
    from .llm_vllm import VllmBackend

    return VllmBackend(bundle, manifest, url, model)


for _kind in (OnnxRuntimeVision(), OpenVinoVision(), TritonVision()):
    register_vision(_kind)
for _kind in (LlamaCpp(), Vllm()):
    register_llm(_kind)

__all__ = ["DEVICES", "LlmBackend", "LlmCapabilities", "LlmKind", "SamplingOptions", "Step", "VisionBackend",
           "VisionKind", "llm_kind", "llm_kinds", "open_llm", "open_vision_backend", "open_vllm", "register_llm",
           "register_vision", "remote_vision_kind", "vision_kind", "vision_kinds"]
