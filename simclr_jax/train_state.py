"""The training state: one pytree of arrays, the only thing the step function carries, and its
creation on the mesh (abstractly for ahead-of-time compilation, or allocated in its shardings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from simclr_jax import parallel
from simclr_jax.models import variables_init


@struct.dataclass
class TrainState:
    """Step counter, model variables and optimizer state (model and optimizer live outside)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def to_tree(self) -> dict[str, Any]:
        """The state as a plain dict, the layout written to checkpoints."""
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
        }

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> TrainState:
        """Inverse of to_tree."""
        return cls(
            step=tree["step"],
            params=tree["params"],
            batch_stats=tree["batch_stats"],
            opt_state=tree["opt_state"],
        )

    def variables(self) -> dict[str, Any]:
        """The model variables as model.apply wants them."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def _state_init(
    model: Any, tx: optax.GradientTransformation, image_size: int
) -> Callable[[jax.Array], TrainState]:
    """rng -> the freshly initialized TrainState of `model` and `tx`."""
    init_variables = variables_init(model, image_size)

    def init(rng: jax.Array) -> TrainState:
        variables = init_variables(rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
        )

    return init


def abstract_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    image_size: int,
    fsdp_min_size: int = 0,
) -> tuple[TrainState, Any]:
    """(state of ShapeDtypeStructs, state shardings) without allocating anything: what
    create_train_state would build, for lowering and compiling the step ahead of time."""
    abstract = jax.eval_shape(_state_init(model, tx, image_size), jax.random.key(0))
    return abstract, parallel.state_shardings(abstract, mesh, fsdp_min_size)


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    image_size: int,
    seed: int,
    fsdp_min_size: int = 0,
) -> tuple[TrainState, Any]:
    """Initializes the state directly in its shardings; returns (state, state shardings)."""
    _, shardings = abstract_train_state(
        model, tx, mesh, image_size=image_size, fsdp_min_size=fsdp_min_size
    )
    init = _state_init(model, tx, image_size)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings
