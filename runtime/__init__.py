"""ldpruner.runtime: onnxruntime sessions, a drop-in ORT UNet for diffusers pipelines, the sampling loop."""
