"""Convolution with a faster kernel gradient on XLA:CPU (the native op everywhere else).

XLA's CPU backend computes the kernel gradient of a conv 2-4x slower than the forward conv
(benchmarks/bench_conv.py: 26 vs 100 GFLOP/s for a 3x3 64->64 conv on 32x32 maps), and a
training step spends a third of its convolution FLOPs there. Written as a matmul of im2col
patches with the output gradient it runs 1.1-4x faster on every ResNet conv shape measured,
1x1 and 7x7 included. The patches are kernel_size^2 times the activations, so they are built a
few images at a time under `lax.scan`: small chunks stay in cache and memory stays bounded.

Only the kernel gradient changes: the forward conv and the input gradient stay XLA's own, and
the kernel gradient equals XLA's up to float summation order (tests/test_models.py per conv,
tests/test_sharding.py for a whole step on 1 and 8 devices). TPU and GPU keep the native
gradient: their conv emitters are fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

KERNEL_GRAD_MODES = ("auto", "xla", "im2col")
# Patch rows per scan iteration. On the 2-core development machine 512-2048 rows were fastest
# for every ResNet conv shape tried (benchmarks/bench_conv.py), 8192 about 10-25 % slower.
CHUNK_ROWS = 1024
NHWC = ("NHWC", "HWIO", "NHWC")


def make_conv_general_dilated(kernel_grad: str) -> Any:
    """The conv function for flax's nn.Conv(conv_general_dilated=...) under a model config's
    model.conv_kernel_grad: 'xla' (native), 'im2col' (always), 'auto' (im2col on CPU only)."""
    if kernel_grad not in KERNEL_GRAD_MODES:
        raise ValueError(
            f"model.conv_kernel_grad={kernel_grad!r} is not one of {KERNEL_GRAD_MODES}; 'auto' "
            "uses the im2col kernel gradient on CPU and XLA's own on TPU/GPU."
        )
    if kernel_grad == "xla" or (kernel_grad == "auto" and jax.default_backend() != "cpu"):
        return lax.conv_general_dilated
    return conv_im2col_kernel_grad


def conv_im2col_kernel_grad(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    **kwargs: Any,
) -> jax.Array:
    """lax.conv_general_dilated's signature; NHWC convs with explicit padding, no dilation and
    no groups (all the encoder uses) get the im2col kernel gradient, anything else is native."""
    native = partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        **kwargs,
    )
    plain = (
        not isinstance(padding, str)
        and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )
    if not plain:
        return native(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads)


def _native(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
    return _native(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return _native(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _native(x, w, strides, pads), x)
    (dx,) = input_vjp(dy)
    return dx, kernel_grad_im2col(x, dy, w.shape, strides, pads).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def kernel_grad_im2col(
    x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides, pads
) -> jax.Array:
    """dL/dw (kh, kw, C, O) = patches(x)^T @ dy, accumulated in float32 over batch chunks.

    The batch is split into `groups` contiguous blocks, one per device when it is sharded
    over them, and each block into chunks: scan iteration i takes chunk i of every block, so
    every device works on its own images. Each block keeps its own partial sum through the
    loop and the blocks are summed once after it. A contraction over the sharded batch inside
    the loop would put an all-reduce in every iteration; XLA:CPU runs such a loop beside the
    step's other collectives, devices can then enter them in different orders, and the step
    deadlocks (seen with 8 simulated devices).
    """
    kh, kw, c, o = kernel_shape
    n, ho, wo, _ = dy.shape
    groups = _batch_groups(n)
    per_group = n // groups
    chunks = _num_chunks(per_group, n * ho * wo)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))

    def blocks(a: jax.Array) -> jax.Array:
        # (n, ...) -> (chunks, groups, per_group // chunks, ...): image g*per_group + k*chunks
        # + i is in chunk i, block g.
        a = a.reshape(groups, per_group // chunks, chunks, *a.shape[1:])
        return jnp.moveaxis(a, 2, 0)

    def accumulate(total, chunk):
        x_chunk, dy_chunk = chunk  # (groups, images, ...)
        g, images = x_chunk.shape[:2]
        taps = [
            lax.slice(
                x_chunk,
                (0, 0, i, j, 0),
                (g, images, i + strides[0] * (ho - 1) + 1, j + strides[1] * (wo - 1) + 1, c),
                (1, 1, strides[0], strides[1], 1),
            )
            for i in range(kh)
            for j in range(kw)
        ]
        patches = jnp.concatenate(taps, axis=-1).reshape(g, images * ho * wo, kh * kw * c)
        grad = jnp.einsum(
            "grk,gro->gko",
            patches,
            dy_chunk.reshape(g, images * ho * wo, o),
            preferred_element_type=jnp.float32,
        )
        return total + grad, None

    zeros = jnp.zeros((groups, kh * kw * c, o), jnp.float32)
    total, _ = lax.scan(accumulate, zeros, (blocks(xp), blocks(dy)))
    return total.sum(axis=0).reshape(kh, kw, c, o)


def _batch_groups(batch: int) -> int:
    """Blocks the batch may be sharded in: a batch split over the devices (the data axis of a
    mesh over all of them, or a sub-mesh whose size divides theirs) falls on block borders."""
    return math.gcd(batch, jax.device_count())


def _num_chunks(per_group: int, rows: int) -> int:
    """The divisor of per_group closest above rows / CHUNK_ROWS (1 for small work): about
    CHUNK_ROWS patch rows per scan iteration over all groups."""
    wanted = max(1, rows // CHUNK_ROWS)
    return min(
        d for d in range(1, per_group + 1) if per_group % d == 0 and d >= min(wanted, per_group)
    )
