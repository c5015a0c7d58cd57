"""Model preparation and execution: per-layer ONNX export, the manifest, the module runner, the tokenizer."""
