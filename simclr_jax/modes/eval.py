"""mode 'eval': restores a checkpoint (init_checkpoint, else the run's own workdir) with the
architecture it was trained with and evaluates it on this config's eval split; trains nothing.
Its step is evaluate.make_eval_step, the one every mode's evaluation runs."""

from __future__ import annotations

import jax.numpy as jnp

from simclr_jax.modes.base import BatchSpec, Config, Mode, no_check


def batch_spec(config: Config) -> BatchSpec:
    """One padded eval batch: images, labels, and the mask that is 0 on padding rows."""
    b, size = config.eval_batch_size, config.data.image_size
    return {
        "image": ((b, size, size, 3), jnp.float32),
        "label": ((b,), jnp.int32),
        "mask": ((b,), jnp.float32),
    }


MODE = Mode(name="eval", validate=no_check, batch_spec=batch_spec, batches=None, loss=None)
