"""simclr_jax: SimCLR v1/v2 contrastive learning in JAX/Flax, TPU-first."""

from simclr_jax import _clu_compat

# Before any submodule imports clu: keeps TensorFlow out unless the tf.data path needs it.
_clu_compat.defer_tensorflow_summary_writer()

__version__ = "0.1.0"
