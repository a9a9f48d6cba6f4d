"""simclr_jax: SimCLR v1/v2 contrastive learning in JAX/Flax, TPU-first."""

__version__ = "0.1.0"
