"""What a mode is: one record of what it trains (or evaluates) with. Every mode's record is a
`Mode` in its own module (pretrain.py, supervised.py, distill.py, eval.py); modes/__init__.py
builds a run's step from it, the same way for the loop and for the preflight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from simclr_jax import data, parallel

Config = ml_collections.ConfigDict
# name -> (global shape, dtype) of one batch's arrays.
BatchSpec = Mapping[str, tuple[tuple[int, ...], Any]]


@dataclasses.dataclass(frozen=True)
class ExtraInputs:
    """Arrays a mode's step reads but never trains (distillation's frozen teacher), and the
    modules its loss applies them with. values: arrays, or ShapeDtypeStructs with shardings for
    the preflight; shardings: one per value; notes: what the preflight reports about them."""

    values: tuple[Any, ...] = ()
    shardings: tuple[Any, ...] = ()
    modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Mode:
    """One mode of a run.

    validate(config): ValueError naming the first field this mode refuses.
    batch_spec(config): the global arrays of one batch its step takes.
    batches(config, mesh, start_step, data_state): the real input from start_step (None: eval,
        whose batches are the eval split every mode is evaluated on).
    loss(config, model, mesh, **extra.modules): loss_fn(params, batch_stats, batch, *extra) for
        step.make_step (None: eval, which trains nothing).
    extra_inputs(config, mesh, abstract): the step's extra inputs (None: there are none).
    metrics: the names the loss adds to the step's metrics.
    extra_results(config, mesh, extra): results beside the trained model's evaluation (None:
        none).
    """

    name: str
    validate: Callable[[Config], None]
    batch_spec: Callable[[Config], BatchSpec]
    batches: Callable[[Config, jax.sharding.Mesh, int, dict[str, Any] | None], Any] | None
    loss: Callable[..., Any] | None
    extra_inputs: Callable[[Config, jax.sharding.Mesh, bool], ExtraInputs] | None = None
    metrics: tuple[str, ...] = ()
    extra_results: Callable[[Config, jax.sharding.Mesh, ExtraInputs], dict[str, Any]] | None = None


def abstract_batch(mode: Mode, config: Config, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The mode's batch as ShapeDtypeStructs, split over the mesh's 'data' axis as the loop's
    global batches are."""
    sharding = parallel.batch_sharding(mesh)
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for name, (shape, dtype) in mode.batch_spec(config).items()
    }


def train_split_batches(
    config: Config,
    mesh: jax.sharding.Mesh,
    start_step: int,
    data_state: dict[str, Any] | None,
    *,
    num_views: int,
    augmentation: str,
) -> data.TrainBatches:
    """The train split's batches, `num_views` augmented views per image, from start_step."""
    return data.make_train_batches(
        config.data,
        mesh,
        split=config.data.train_split,
        batch_size=config.train_batch_size,
        num_views=num_views,
        augmentation=augmentation,
        seed=config.seed,
        start_step=start_step,
        data_state=data_state,
    )


def no_check(config: Config) -> None:
    """A mode without fields of its own to check."""
    del config


def require(ok: bool, message: str) -> None:
    """Raises ValueError(message) unless ok."""
    if not ok:
        raise ValueError(message)
