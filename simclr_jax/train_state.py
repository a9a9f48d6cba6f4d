"""The training state: one pytree of arrays, the only thing the step function carries."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


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
