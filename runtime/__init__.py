"""ldpruner.runtime: onnxruntime sessions, a drop-in ORT UNet for diffusers pipelines, the sampling loop.

What a deployment needs besides onnxruntime, and what the passes run a UNet with; imports the base layer only. The
public surface is listed below and resolves lazily, so importing ``ldpruner.runtime`` does not load torch.

    session     OrtSession, create_session, default_providers (execution providers, tensors kept on device)
    unet        ORTUNet, load_unet_config (an exported UNet callable like a diffusers UNet)
    dropin      UNetDropIn (the diffusers-UNet call both drop-ins share, and its shape check)
    graph_unet  GraphUNet (a traced or pruned graph called like a UNet)
    sampling    sample_latents, fresh_scheduler, latent_channels, learned_variance, guidance_embedding,
                unet_calls_per_step (the one sampling loop)
    timing      measure_interleaved, measure_ratio → LatencyStats, RatioMeasurement (interleaved timing)
"""

from __future__ import annotations

from ldpruner.base.lazy import lazy_exports

__all__ = [
    "GraphUNet",
    "LatencyStats",
    "ORTUNet",
    "OrtSession",
    "RatioMeasurement",
    "UNetDropIn",
    "create_session",
    "default_providers",
    "fresh_scheduler",
    "guidance_embedding",
    "latent_channels",
    "learned_variance",
    "load_unet_config",
    "measure_interleaved",
    "measure_ratio",
    "sample_latents",
    "unet_calls_per_step",
]

_WHERE = {
    "OrtSession": "session", "create_session": "session", "default_providers": "session",
    "ORTUNet": "unet", "load_unet_config": "unet",
    "UNetDropIn": "dropin",
    "GraphUNet": "graph_unet",
    "fresh_scheduler": "sampling", "guidance_embedding": "sampling", "latent_channels": "sampling",
    "learned_variance": "sampling", "sample_latents": "sampling", "unet_calls_per_step": "sampling",
    "LatencyStats": "timing", "RatioMeasurement": "timing", "measure_interleaved": "timing",
    "measure_ratio": "timing",
}

__getattr__ = lazy_exports(__name__, _WHERE)
