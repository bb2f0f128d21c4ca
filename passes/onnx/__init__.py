"""ONNX: export a traced (pruned) UNet and validate it against torch (``export``), onnxruntime's graph optimizer
and fp16 variants (``optimize``), the numeric checks both use (``numeric_check``) and all-or-nothing publishing
of the files (``files``)."""
