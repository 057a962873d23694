"""ONNX export: the three graphs, our custom ops as ONNX functions, the manifest."""
