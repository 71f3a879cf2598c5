"""convllava-edge: hierarchical-backbone multimodal models (ConvLLaVA, LLaVA-Mini) on the edge.

The runtime (this package's top-level modules) needs numpy, Pillow, onnxruntime and
llama-cpp-python; it never imports torch. ``convllava_edge.export`` makes bundles and needs the
``export`` extra.
"""

__version__ = "0.1.0"
