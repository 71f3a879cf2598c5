"""The PyTorch-side exporters: checkpoint reading, ONNX graphs, GGUF conversion (needs the export extra)."""
