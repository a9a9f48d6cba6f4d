"""Optimizers and learning-rate schedules: LARS / momentum / Adam with warmup + cosine decay.

As the reference (google-research/simclr tf2/model.py, tf2/lars_optimizer.py): LARS leaves
batch-norm parameters, biases and the supervised head ('classifier', the reference's
head_supervised) out of weight decay and the trust ratio; the head's kernel gets its decay as an
L2 term instead (gradient + wd*w), so the head runs plain TF-classic momentum at the full
learning rate. Distillation's LARS (the reference's distillation colab) excludes only batch
normalization and biases, so there the student's head kernel is trust-ratio scaled like every
other kernel (`trust_ratio_exclusions('distill')` is empty). Momentum and Adam add wd*w to the
gradient of every leaf but the batch-norm ones (the reference's L2 loss over non-batch-norm
weights). Leaves are told apart by path.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("lars", "momentum", "adam")
LR_SCALINGS = ("linear", "sqrt", "none")
# Flax names: nn.Dense / nn.Conv biases are 'bias'; nn.BatchNorm has 'scale' (gamma) and
# 'bias' (beta). Kernels (conv, dense, SK attention convs) are the only decayed leaves.
EXCLUDED_LEAF_NAMES = frozenset({"bias", "scale"})
# Modules outside LARS adaptation: the supervised head (online probe / fine-tuning classifier).
SUPERVISED_HEAD_NAMES = frozenset({"classifier"})
# Batch-norm modules are named 'bn' in simclr_jax.models (Flax's default is 'BatchNorm_<i>').
BATCH_NORM_MODULE_PREFIXES = ("bn", "BatchNorm")


def _is_int(value: Any) -> bool:
    """True for Python and NumPy integers, but not for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """Peak LR from the base LR: linear base*B/256, sqrt base*sqrt(B), or none (base)."""
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if not base_lr >= 0:
        raise ValueError(f"optim.learning_rate={base_lr!r} must be >= 0.")
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return float(base_lr)
    raise ValueError(
        f"optim.lr_scaling={scaling!r} is not supported; choose one of {', '.join(LR_SCALINGS)}."
    )


def warmup_cosine_schedule(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine decay to exactly 0 at total_steps."""
    _check_durations(total_steps, warmup_steps)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * peak_lr * (1.0 + jnp.cos(jnp.pi * progress))
        lr = jnp.where(step < warmup_steps, warmup, cosine)
        # cos(pi) in float32 is not exactly -1 on every backend; the end must be exactly 0.
        return jnp.where(step >= total_steps, 0.0, lr)

    return schedule


def _leaf_name(path: tuple[Any, ...]) -> str:
    """Name of the last key of a pytree path ('' when it has none)."""
    if not path:
        return ""
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def _names(path: tuple[Any, ...]) -> list[str]:
    """Every key of a pytree path as a string."""
    return [_leaf_name((p,)) for p in path]


def weight_decay_mask(params: Any) -> Any:
    """Tree of bools, True where LARS decays a leaf (wd*w added to its gradient).

    Excluded (False): leaves named 'bias' (dense/conv biases and BatchNorm beta) and 'scale'
    (BatchNorm gamma). Everything else, i.e. conv and dense kernels, is True; the supervised
    head's kernel too, which stands for the reference's L2 loss term on it.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in EXCLUDED_LEAF_NAMES, params
    )


def trust_ratio_mask(params: Any, excluded_modules: Collection[str] = SUPERVISED_HEAD_NAMES) -> Any:
    """Tree of bools, True where LARS scales a leaf's step by the trust ratio.

    The decayed leaves (`weight_decay_mask`) minus those under a module named in
    `excluded_modules`. The default, the supervised head ('classifier'), is what the reference
    excludes from layer adaptation when pretraining and fine-tuning (exclude_from_layer_adaptation
    falls back to exclude_from_weight_decay = batch_normalization, bias, head_supervised); its
    distillation excludes no module (pass an empty collection).
    """
    excluded = frozenset(excluded_modules)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (
            _leaf_name(path) not in EXCLUDED_LEAF_NAMES and not excluded.intersection(_names(path))
        ),
        params,
    )


def classifier_mask(params: Any) -> Any:
    """Tree of bools, True for the supervised head's leaves ('classifier')."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(SUPERVISED_HEAD_NAMES.intersection(_names(path))), params
    )


def trust_ratio_exclusions(mode: str) -> frozenset[str]:
    """Modules LARS keeps out of the trust ratio in a train mode: none when distilling (the
    reference's distillation LARS excludes only batch norm and biases), else the supervised head.
    """
    return frozenset() if mode == "distill" else SUPERVISED_HEAD_NAMES


def l2_mask(params: Any) -> Any:
    """Tree of bools, True for every leaf outside batch norm (momentum / Adam L2 decay).

    The reference adds wd * l2_loss(v) for every trainable variable whose name lacks
    'batch_normalization' when the optimizer is not LARS: kernels and biases alike.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(n.startswith(BATCH_NORM_MODULE_PREFIXES) for n in _names(path)),
        params,
    )


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    nesterov: bool = False,
    trust_ratio_excluded_modules: Collection[str] = SUPERVISED_HEAD_NAMES,
) -> optax.GradientTransformation:
    """SimCLR LARS; BN params, biases and `trust_ratio_excluded_modules` (default: the
    supervised head) outside the trust ratio.

    `config.optim.nesterov` applies to the momentum optimizer only (as in SimCLR, whose LARS
    runs classic momentum); `nesterov` here is for direct callers.

    Per kernel: g' = g + wd*w; trust = eta*||w||/||g'|| (1 if either norm is 0, and 1 for the
    excluded modules); v = m*v + lr*trust*g'; w -= v (TF-style momentum: the LR is inside the
    momentum). BN params and biases: v = m*v + lr*g. optax.lars composes exactly this rule
    (its trace holds -v), so it is used as is.
    """
    return optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        trust_coefficient=trust_coefficient,
        eps=0.0,
        trust_ratio_mask=functools.partial(
            trust_ratio_mask, excluded_modules=frozenset(trust_ratio_excluded_modules)
        ),
        momentum=momentum,
        nesterov=nesterov,
    )


def momentum_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum; wd*w added to the gradient of every non-BN leaf (L2)."""
    sgd = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
    if weight_decay == 0:
        return sgd
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=l2_mask), sgd)


def adam(
    learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Adam with L2 decay: wd*w added to the gradient of every non-BN leaf before Adam's
    scaling (the reference's L2 loss term), not AdamW's decoupled decay."""
    adam_tx = optax.adam(learning_rate)
    if weight_decay == 0:
        return adam_tx
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=l2_mask), adam_tx)


def _check_durations(total_steps: Any, warmup_steps: Any) -> None:
    """Raises unless 0 <= warmup_steps <= total_steps and total_steps > 0."""
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(
            f"total_steps={total_steps!r} must be a positive integer; set train_steps or "
            "train_epochs > 0."
        )
    if not _is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps!r} must be an integer in [0, total_steps={total_steps}]; "
            "lower warmup_steps / warmup_epochs."
        )


def _check_optim_config(optim_config: Any) -> None:
    """Raises a ValueError naming the first bad `optim.*` field."""
    name = optim_config["optimizer"]
    if name not in OPTIMIZERS:
        raise ValueError(
            f"optim.optimizer={name!r} is not supported; choose one of {', '.join(OPTIMIZERS)}."
        )
    weight_decay = optim_config["weight_decay"]
    if not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(
            f"optim.weight_decay={weight_decay!r} must be a number >= 0 (SimCLR: 1e-6)."
        )
    momentum = optim_config["momentum"]
    if not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
        raise ValueError(f"optim.momentum={momentum!r} must be in [0, 1) (SimCLR: 0.9).")
    scale = optim_config.get("classifier_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
        raise ValueError(
            f"optim.classifier_lr_scale={scale!r} must be a number > 0 (the reference: 1.0)."
        )
    eta = optim_config.get("trust_coefficient", 0.001)
    if name == "lars" and (not isinstance(eta, numbers.Real) or not eta > 0):
        raise ValueError(f"optim.trust_coefficient={eta!r} must be > 0 (SimCLR: 0.001).")


def create_optimizer(
    optim_config: Any,
    *,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
    trust_ratio_excluded_modules: Collection[str] = SUPERVISED_HEAD_NAMES,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds (optimizer, LR schedule) from `config.optim` and the run's batch and durations.

    trust_ratio_excluded_modules: modules LARS leaves out of the trust ratio (the caller's
    choice by mode: the supervised head except when distilling); ignored by the others."""
    _check_optim_config(optim_config)
    _check_durations(total_steps, warmup_steps)
    peak_lr = scaled_learning_rate(
        optim_config["learning_rate"], batch_size, optim_config["lr_scaling"]
    )
    schedule = warmup_cosine_schedule(peak_lr, warmup_steps, total_steps)
    name = optim_config["optimizer"]
    weight_decay = float(optim_config["weight_decay"])
    if name == "lars":
        tx = lars(
            schedule,
            weight_decay=weight_decay,
            momentum=optim_config["momentum"],
            trust_coefficient=optim_config.get("trust_coefficient", 0.001),
            trust_ratio_excluded_modules=trust_ratio_excluded_modules,
        )
    elif name == "momentum":
        tx = momentum_optimizer(
            schedule,
            weight_decay=weight_decay,
            momentum=optim_config["momentum"],
            nesterov=optim_config.get("nesterov", False),
        )
    else:
        tx = adam(schedule, weight_decay=weight_decay)
    scale = float(optim_config.get("classifier_lr_scale", 1.0))
    if scale != 1.0:
        # Every rule here is linear in the LR, so scaling the final update scales its LR.
        tx = optax.chain(tx, optax.masked(optax.scale(scale), classifier_mask))
    return tx, schedule
