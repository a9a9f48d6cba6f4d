"""Losses and metrics: cross-replica NT-Xent (SimCLR) and small classification helpers.

All math runs in float32 whatever the input dtype. The NT-Xent loss runs inside one
`jax.shard_map` over the mesh's data axis: every device all-gathers the (small) projections and
builds only its own (B_local x 2N) logits, never the full (2N x 2N) similarity matrix.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from simclr_jax import parallel

# Subtracted from self-similarity logits so that a view is never its own negative.
LARGE_NUM = 1e9
# Cosine similarities at temperature 0.1 span only +-10; full-precision dot products keep the
# loss identical across backends (TPU would otherwise use one bfloat16 pass for float32).
_MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def _check_temperature(temperature: Any) -> float:
    """Returns the temperature as float, or raises naming `loss.temperature`."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(
            f"loss.temperature={temperature!r} must be a positive number (e.g. 0.1 or 0.5)."
        )
    if not temperature > 0:
        raise ValueError(
            f"loss.temperature={temperature!r} must be > 0 (SimCLR uses 0.1 on ImageNet, "
            "0.5 on CIFAR-10)."
        )
    return float(temperature)


def _check_pair(z1: Any, z2: Any) -> None:
    """Raises unless z1 and z2 are two (batch, dim) arrays of the same shape."""
    if z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent needs z1 and z2 of equal shape; got z1 {z1.shape} and z2 {z2.shape}."
        )
    if z1.ndim != 2 or z1.shape[0] == 0:
        raise ValueError(f"nt_xent needs (batch, dim) projections; got shape {z1.shape}.")


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
    """Scales x to unit L2 norm along `axis` (norms below sqrt(epsilon) are clamped)."""
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, epsilon))


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T in float32 at full precision."""
    return jnp.einsum("id,jd->ij", a, b, precision=_MATMUL_PRECISION)


def nt_xent_local(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float,
    hidden_norm: bool = True,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-replica NT-Xent on local (B, d) views; gathers negatives over `axis_name` if given.

    Returns the loss and metrics averaged over this replica's rows and then (with an axis
    name) over all replicas, so every replica returns the same global values.
    """
    temperature = _check_temperature(temperature)
    _check_pair(z1, z2)
    z1 = z1.astype(jnp.float32)
    z2 = z2.astype(jnp.float32)
    if hidden_norm:
        z1, z2 = l2_normalize(z1), l2_normalize(z2)
    local_batch = z1.shape[0]
    if axis_name is None:
        z1_all, z2_all, replica = z1, z2, 0
    else:
        # The transpose of a tiled all_gather is a reduce-scatter, so gradients from the
        # other replicas' losses flow back to the rows this replica owns.
        z1_all = jax.lax.all_gather(z1, axis_name, tiled=True)
        z2_all = jax.lax.all_gather(z2, axis_name, tiled=True)
        replica = jax.lax.axis_index(axis_name)
    num_global = z1_all.shape[0]
    positives = replica * local_batch + jnp.arange(local_batch)
    self_mask = jax.nn.one_hot(positives, num_global, dtype=jnp.float32)

    logits_aa = _dot_t(z1, z1_all) / temperature - self_mask * LARGE_NUM
    logits_bb = _dot_t(z2, z2_all) / temperature - self_mask * LARGE_NUM
    logits_ab = _dot_t(z1, z2_all) / temperature
    logits_ba = _dot_t(z2, z1_all) / temperature

    def cross_entropy(logits: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(log_probs, positives[:, None], axis=-1)[:, 0]

    loss_a = cross_entropy(jnp.concatenate([logits_ab, logits_aa], axis=1))
    loss_b = cross_entropy(jnp.concatenate([logits_ba, logits_bb], axis=1))
    loss = jnp.mean(loss_a + loss_b)

    log_probs_ab = jax.nn.log_softmax(logits_ab, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs_ab) * log_probs_ab, axis=-1)
    correct = (jnp.argmax(logits_ab, axis=-1) == positives).astype(jnp.float32)
    metrics = {"contrast_acc": jnp.mean(correct), "contrast_entropy": jnp.mean(entropy)}
    if axis_name is not None:
        loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
    return loss, metrics


def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    mesh: Mesh,
    *,
    temperature: float,
    hidden_norm: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLR NT-Xent over the global batch of (B, d) views z1, z2 sharded on the data axis.

    Returns (loss, {'contrast_acc', 'contrast_entropy'}), float32 scalars replicated on the
    mesh. Works eagerly and inside an outer `jax.jit`; differentiable.
    """
    temperature = _check_temperature(temperature)
    _check_pair(z1, z2)
    replicas = parallel.data_axis_size(mesh)
    if z1.shape[0] % replicas:
        raise ValueError(
            f"nt_xent batch of {z1.shape[0]} rows is not divisible by the {replicas} devices "
            f"on the '{parallel.DATA_AXIS}' mesh axis; use a multiple of {replicas}."
        )
    per_replica = jax.shard_map(
        lambda a, b: nt_xent_local(
            a,
            b,
            temperature=temperature,
            hidden_norm=hidden_norm,
            axis_name=parallel.DATA_AXIS,
        ),
        mesh=mesh,
        in_specs=(PartitionSpec(parallel.DATA_AXIS), PartitionSpec(parallel.DATA_AXIS)),
        out_specs=(PartitionSpec(), PartitionSpec()),
    )
    return per_replica(z1, z2)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean softmax cross entropy of integer labels (mean over rows where mask > 0 if given)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    per_example = -jnp.sum(one_hot * log_probs, axis=-1)
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(jnp.float32)
    # An all-padding batch gives 0 instead of NaN.
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where the label is among the k largest logits, else 0.0."""
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk_correct k={k} must be in [1, {num_classes}] (number of classes).")
    _, top_indices = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(top_indices == labels[:, None], axis=-1).astype(jnp.float32)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    labeled_logits: jax.Array | None = None,
    labels: jax.Array | None = None,
    alpha: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLRv2 distillation (paper eqs. 2-3): alpha x tau^2 x mean_x -sum_y P_T(y|x;tau)
    log P_S(y|x;tau) + (1 - alpha) x mean cross entropy of labeled_logits (tau 1) when alpha < 1.

    The tau^2 weight is the reference's (add_kd_loss: softmax_cross_entropy(..., weights=tau**2)):
    the gradient on the student's logits is tau x (P_S - P_T), so its scale does not grow as
    1/tau when tau is lowered. The teacher's probabilities are constants (stop_gradient). Means,
    not the paper's sums over the data set: the scale is absorbed by the learning rate.
    """
    tau = _check_temperature(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    targets = jax.nn.softmax(teacher / tau, axis=-1)
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    distill = tau**2 * jnp.mean(-jnp.sum(targets * log_student, axis=-1))
    agreement = jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher, axis=-1)
    metrics = {"distill_loss": distill, "teacher_agreement": jnp.mean(agreement)}
    if alpha >= 1.0 or labeled_logits is None:
        return distill, metrics
    labeled = softmax_cross_entropy(labeled_logits, labels, labeled_logits.shape[-1])
    metrics["labeled_loss"] = labeled
    return alpha * distill + (1.0 - alpha) * labeled, metrics
