"""Quantization of bundle parts: ONNX fp16/int8 variants and llama.cpp GGUF types."""
