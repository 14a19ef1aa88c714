"""Compression of the trained fusion model: pruning, ONNX export, int8 quantization."""
