"""config.data.backend picks the input path: 'tfdata' (host augmentation, pipeline.py) or
'jax' (Grain host crops, device augmentation; no TensorFlow). Both modules load lazily.
make_train_batches is the training-input entry point, with a checkpointable state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from simclr_jax import parallel
from simclr_jax.data import common, spec

_AUGMENT_SALT = 0x5EED  # device augmentation keys: fold_in(key(seed), salt), then example ids


def make_device_augment(
    data_config: Any, mesh: Mesh, *, num_views: int, augmentation: str, seed: int
):
    """Jitted fn(global host crops, ids) -> views, sharded on 'data': (B, V, S, S, 3) for
    pretraining, (B, S, S, 3) when num_views == 1 (the supervised steps' layout)."""
    from simclr_jax.data import jax_augment

    params = spec.augment_params(data_config)
    augment = jax_augment.make_augment_fn(params, mesh, augmentation=augmentation)

    def views(crops: jax.Array, ids: jax.Array) -> jax.Array:
        # The key is built inside the jit: a constant, so no host array is passed around
        # (multi-process runs need every input to be a global array).
        key = jax.random.fold_in(jax.random.key(seed), _AUGMENT_SALT)
        out = augment(key, crops, ids)
        return out[:, 0] if num_views == 1 else out

    batch = parallel.batch_sharding(mesh)
    return jax.jit(views, in_shardings=(batch, batch), out_shardings=batch)


class TrainBatches:
    """Global train batches {'image': views, 'label'} on a mesh, one per step, with the input
    position to checkpoint: `state()` after batch k is what a resumed run passes back as
    `data_state` (through the checkpoint's JSON metadata) to continue at batch k + 1."""

    def __init__(
        self, host: Iterator[dict[str, Any]], mesh: Mesh, augment: Callable, start_step: int
    ) -> None:
        self._host, self._mesh, self._augment = host, mesh, augment
        self._step = start_step
        self._host_state = _host_state(host)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self._host)
        self._step += 1
        self._host_state = _host_state(self._host)  # after this batch, whatever is prefetched
        return self._augment(parallel.host_batch_to_global(batch, self._mesh))

    def state(self) -> dict[str, Any]:
        """JSON: the next step's number and the host iterator's own state (Grain), if any."""
        return {"next_step": self._step, "host": self._host_state}

    def close(self) -> None:
        """Stops the host iterator's workers, if it has any."""
        getattr(self._host, "close", lambda: None)()


def _host_state(host: Any) -> Any:
    get_state = getattr(host, "get_state", None)
    return get_state() if get_state is not None else None


def make_train_batches(
    data_config: Any,
    mesh: Mesh,
    *,
    split: str,
    batch_size: int,
    num_views: int,
    augmentation: str,
    seed: int,
    start_step: int = 0,
    data_state: dict[str, Any] | None = None,
) -> TrainBatches:
    """The training input of run_training: global batches {'image': views, 'label'} on
    `mesh` from the configured backend, starting at batch start_step; batch k depends only on
    (seed, k) (tf.data: with data.deterministic). `data_state` (a TrainBatches.state() saved
    with the checkpoint of start_step) restores the host iterator's own state where it has one."""
    if data_state is not None and int(data_state.get("next_step", -1)) != start_step:
        raise ValueError(
            f"data_state is for step {data_state.get('next_step')!r} but training resumes at "
            f"step {start_step}; pass the data_state saved with the checkpoint being restored."
        )
    iterator = make_train_iterator(
        data_config,
        split=split,
        batch_size=batch_size,
        num_views=num_views,
        augmentation=augmentation,
        seed=seed,
        start_step=start_step,
    )
    host_state = (data_state or {}).get("host")
    if host_state is not None and hasattr(iterator, "set_state"):
        iterator.set_state(host_state)
    if common.backend(data_config) == "tfdata":  # its batches are views already
        return TrainBatches(iterator, mesh, lambda batch: batch, start_step)
    device = make_device_augment(
        data_config, mesh, num_views=num_views, augmentation=augmentation, seed=seed
    )
    # Dispatch is asynchronous: the host goes on to the next batch while this one augments.
    augment = lambda batch: {"image": device(batch["image"], batch["id"]), "label": batch["label"]}
    return TrainBatches(iterator, mesh, augment, start_step)


def make_eval_iterator(data_config: Any, **kwargs: Any):
    """One eval pass from the configured backend (same batches and padding either way)."""
    if common.backend(data_config) == "tfdata":
        from simclr_jax.data import pipeline

        return pipeline.make_eval_iterator(data_config, **kwargs)
    from simclr_jax.data import numpy_pipeline

    return numpy_pipeline.make_eval_iterator(data_config, **kwargs)


def make_train_iterator(
    data_config: Any, *, num_views: int, augmentation: str, **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Host train batches of the configured backend: tf.data views, or (backend 'jax') float32
    crops with ids, which make_device_augment turns into views on the device."""
    if common.backend(data_config) == "tfdata":
        from simclr_jax.data import pipeline

        return pipeline.make_train_iterator(
            data_config, num_views=num_views, augmentation=augmentation, **kwargs
        )
    from simclr_jax.data import grain_pipeline

    supervised = augmentation == "crop_flip"
    return grain_pipeline.make_train_iterator(
        data_config, num_views=num_views, supervised=supervised, **kwargs
    )
