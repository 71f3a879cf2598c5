"""convllava-edge: hierarchical-backbone multimodal models (ConvLLaVA, LLaVA-Mini) on the edge.

The runtime (this package's top-level modules) needs numpy, Pillow, onnxruntime and
llama-cpp-python; it never imports torch. ``convllava_edge.export`` makes bundles and needs the
``export`` extra.
"""

__version__ = "0.1.0"


def load(bundle=None, **kwargs):
    """Load a bundle for asking questions: ``convllava_edge.load("bundle/").ask("cat.jpg", "What is it?")``.

    With no bundle, the demo model shipped with the package. Keyword arguments: device ("auto",
    "cpu", "cuda"), threads, vision_type, n_ctx, cache (True, False or a cache.DiskCache), vision_backend,
    llm_backend ("llama.cpp" or "vllm") with llm_url (and llm_model) for a vLLM server.
    """
    from .model import load as _load

    return _load(bundle, **kwargs)
