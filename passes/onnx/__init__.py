"""ONNX: export a traced (pruned) UNet (``export``) and validate it against torch (``validate``), onnxruntime's
graph optimizer and fp16 variants (``optimize``), the numeric checks both use (``numeric_check``) and
all-or-nothing publishing of the files (``files``)."""
