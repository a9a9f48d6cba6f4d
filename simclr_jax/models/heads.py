"""SimCLR projection head g(h) -> z and the supervised (linear) head.

Parameter paths: projection_head/layer{1..L}/dense/kernel, projection_head/layer{j}/bn/{scale,bias}
(the last layer's BN has no bias). Layers are numbered from 1 so that layer j's output is
hiddens[j], the tensor ft_proj_selector=j picks; hiddens[0] is the head's input h.
The heads compute in float32 whatever the encoder's dtype: they are a tiny share of the FLOPs
and z feeds a temperature-scaled softmax.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.resnet import is_integer

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
head_kernel_init = nn.initializers.normal(stddev=0.01)


def num_head_outputs(proj_head_mode: str, num_proj_layers: int) -> int:
    """Length of the hiddens list: the input h plus one entry per head layer."""
    return 1 + {"none": 0, "linear": 1, "nonlinear": num_proj_layers}[proj_head_mode]


def validate_head_args(
    *, proj_head_mode: Any, num_proj_layers: Any, proj_out_dim: Any, ft_proj_selector: Any
) -> None:
    """Raises ValueError naming the model.* field when a projection-head argument is invalid."""
    if proj_head_mode not in PROJ_HEAD_MODES:
        raise ValueError(
            f"model.proj_head_mode={proj_head_mode!r} is not supported; "
            f"choose one of {', '.join(PROJ_HEAD_MODES)}"
        )
    if not is_integer(num_proj_layers) or (proj_head_mode == "nonlinear" and num_proj_layers < 1):
        raise ValueError(
            f"model.num_proj_layers={num_proj_layers!r} must be an integer >= 1 "
            "(SimCLR v1 uses 2, v2 uses 3)"
        )
    if not is_integer(proj_out_dim) or proj_out_dim <= 0:
        raise ValueError(
            f"model.proj_out_dim={proj_out_dim!r} must be a positive integer, e.g. 128"
        )
    num_outputs = num_head_outputs(proj_head_mode, int(num_proj_layers))
    if not is_integer(ft_proj_selector) or not -num_outputs <= ft_proj_selector < num_outputs:
        raise ValueError(
            f"model.ft_proj_selector={ft_proj_selector!r} is out of range for "
            f"proj_head_mode={proj_head_mode!r} with {num_outputs - 1} head layer(s); choose an "
            f"integer in {-num_outputs}..{num_outputs - 1} (0 = h, 1 = after the first layer, "
            "-1 = the last)"
        )


class DenseBN(nn.Module):
    """Dense without bias, N(0, 0.01) init, then BatchNorm (with or without its bias/center)."""

    features: int
    center: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Dense -> BN; no activation (the caller adds ReLU for middle layers)."""
        x = nn.Dense(self.features, use_bias=False, kernel_init=head_kernel_init, name="dense")(x)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            use_bias=self.center,
            dtype=jnp.float32,
            name="bn",
        )(x)


class ProjectionHead(nn.Module):
    """SimCLR projection head; returns (z, hiddens) with hiddens[0] = h and hiddens[-1] = z.

    nonlinear: num_layers DenseBN layers; middle ones keep the input width, BN with center and
    ReLU; the last maps to out_dim with BN without center and no ReLU. linear: one DenseBN to
    out_dim without center. none: z = h.
    """

    mode: str = "nonlinear"
    num_layers: int = 3
    out_dim: int = 128
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        """Maps h (N, C) to z (N, out_dim) (or h itself for mode 'none') and all layer outputs."""
        validate_head_args(
            proj_head_mode=self.mode,
            num_proj_layers=self.num_layers,
            proj_out_dim=self.out_dim,
            ft_proj_selector=0,
        )
        hiddens = [h.astype(jnp.float32)]
        num_layers = {"none": 0, "linear": 1, "nonlinear": int(self.num_layers)}[self.mode]
        for j in range(1, num_layers + 1):
            is_last = j == num_layers
            x = DenseBN(
                int(self.out_dim) if is_last else hiddens[-1].shape[-1],
                center=not is_last,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                name=f"layer{j}",
            )(hiddens[-1], train)
            hiddens.append(x if is_last else nn.relu(x))
        return hiddens[-1], hiddens


def supervised_head(
    num_classes: int, zero_init: bool = False, name: str = "classifier"
) -> nn.Dense:
    """Linear classifier with bias (float32); zero_init zeroes the kernel so logits start at 0."""
    return nn.Dense(
        num_classes,
        kernel_init=nn.initializers.zeros if zero_init else head_kernel_init,
        dtype=jnp.float32,
        name=name,
    )


def validate_num_classes(num_classes: Any) -> None:
    """Raises ValueError unless num_classes is a positive integer."""
    if not is_integer(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")


__all__ = [
    "PROJ_HEAD_MODES",
    "DenseBN",
    "ProjectionHead",
    "supervised_head",
    "num_head_outputs",
    "validate_head_args",
    "validate_num_classes",
]
