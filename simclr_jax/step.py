"""The one training-step factory every mode uses: a mode supplies its loss function, this module
adds the gradient, the optimizer update and the norms, and jits the whole step with explicit
shardings (state as created, batch split on 'data', metrics replicated) and the state donated.

    loss_fn(params, batch_stats, batch, *extra) -> (loss, (new batch_stats, metrics))

`extra` are arrays the loss reads but never trains (distillation's frozen teacher): ordinary
arguments of the jitted step with their own shardings, never donated and never baked into the
executable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from simclr_jax import parallel
from simclr_jax.train_state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]
StepFn = Callable[..., tuple[TrainState, Metrics]]


def apply_update(
    state: TrainState,
    tx: optax.GradientTransformation,
    grads: Any,
    batch_stats: Any,
) -> tuple[TrainState, Metrics]:
    """Applies one optimizer update; returns the new state and norm metrics."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    norms = {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
    return new_state, norms


def make_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    extra_shardings: Sequence[Any] = (),
) -> StepFn:
    """step(state, batch, *extra) -> (state, metrics): loss, gradients and the update of the
    state's params in ONE jit; metrics are the loss's own plus loss, grad/param norms and the
    LR. extra_shardings: one per extra input of loss_fn."""

    def step_fn(state: TrainState, batch: Batch, *extra: Any):
        def loss_of(params: Any):
            return loss_fn(params, state.batch_stats, batch, *extra)

        (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        new_state, norms = apply_update(state, tx, grads, batch_stats)
        return new_state, {"loss": loss, **aux, **norms, "learning_rate": schedule(state.step)}

    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh), *extra_shardings),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),  # the state only: extra inputs are read, never written
    )
