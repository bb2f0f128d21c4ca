"""ldpruner: prune latent diffusion UNets by latent-deviation importance (LD-Pruner), as a compiler pass."""

__version__ = "0.1.0"
