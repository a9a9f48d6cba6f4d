"""LARS against a NumPy hand computation, schedules, LR scaling and config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import loop, optim
from simclr_jax.config import get_base_config


def _params_and_grads():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.normal(size=shape).astype(np.float32)

    params = {
        "conv": {"kernel": arr(3, 3, 2, 4)},
        "bn": {"scale": arr(4), "bias": arr(4)},
        "dense": {"kernel": arr(4, 3), "bias": arr(3)},
        "zero": {"kernel": np.zeros((2, 2), np.float32)},  # ||w|| = 0 -> trust 1
        "classifier": {"kernel": arr(4, 3), "bias": arr(3)},  # L2-decayed, no trust ratio
    }
    grads = jax.tree.map(lambda p: arr(*p.shape), params)
    return params, grads


DECAYED = {("conv", "kernel"), ("zero", "kernel"), ("dense", "kernel"), ("classifier", "kernel")}
TRUSTED = DECAYED - {("classifier", "kernel")}
NOT_BN = set(DECAYED) | {("dense", "bias"), ("classifier", "bias")}


def _numpy_lars_step(params, grads, velocity, lr, wd, eta=0.001, m=0.9):
    """SimCLR LARS rule written out: returns (new_params, new_velocity) as flat dicts."""
    new_params, new_velocity = {}, {}
    for key, w in params.items():
        g = grads[key].astype(np.float64)
        w = w.astype(np.float64)
        trust = 1.0
        if key in DECAYED:
            g = g + wd * w
        if key in TRUSTED:
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            if w_norm > 0 and g_norm > 0:
                trust = eta * w_norm / g_norm
        v = m * velocity[key] + lr * trust * g
        new_velocity[key] = v
        new_params[key] = w - v
    return new_params, new_velocity


def _flat(tree):
    return {(a, b): np.asarray(leaf) for a, sub in tree.items() for b, leaf in sub.items()}


def test_weight_decay_mask_excludes_bias_and_bn_scale():
    params, _ = _params_and_grads()
    mask = _flat(optim.weight_decay_mask(params))
    assert {key for key, decayed in mask.items() if decayed} == DECAYED


def test_trust_ratio_mask_also_excludes_the_supervised_head():
    params, _ = _params_and_grads()
    mask = _flat(optim.trust_ratio_mask(params))
    assert {key for key, adapted in mask.items() if adapted} == TRUSTED


def test_trust_ratio_mask_without_excluded_modules_adapts_every_decayed_leaf():
    params, _ = _params_and_grads()
    mask = _flat(optim.trust_ratio_mask(params, excluded_modules=()))
    assert {key for key, adapted in mask.items() if adapted} == DECAYED


def test_trust_ratio_exclusions_by_mode():
    """Distillation's LARS (the reference colab) excludes only batch norm and biases; the
    other modes keep the supervised head out of the trust ratio."""
    assert optim.trust_ratio_exclusions("distill") == frozenset()
    for mode in ("pretrain", "linear_eval", "finetune"):
        assert optim.trust_ratio_exclusions(mode) == {"classifier"}


def _model_params():
    """Model paths: a trainable encoder kernel and the classifier (the student's head)."""
    rng = np.random.default_rng(3)
    arr = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return {
        "encoder": {"stage4": {"block0": {"conv1": {"conv": {"kernel": arr(3, 3, 4, 8)}}}}},
        "classifier": {"kernel": arr(8, 10), "bias": arr(10)},
    }


@pytest.mark.parametrize("mode", ["distill", "finetune", "linear_eval"])
def test_student_classifier_gets_the_trust_ratio_only_when_distilling(mode):
    """One LARS update of loop.create_optimizer against NumPy: in distill mode the classifier
    kernel's step is lr * eta * ||w|| / ||g + wd*w|| * (g + wd*w) like any kernel; in
    linear_eval and finetune it is lr * (g + wd*w) (trust 1)."""
    lr, wd = 0.5, 1e-3
    config = get_base_config()
    config.mode = mode
    config.model.fine_tune_after_block = 4 if mode == "linear_eval" else -1
    config.optim.update(optimizer="lars", learning_rate=lr, lr_scaling="none", weight_decay=wd)
    params = _model_params()
    grads = jax.tree.map(lambda p: np.full_like(p, 0.3) + 0.05 * p, params)
    tx, _ = loop.create_optimizer(config, loop.Durations(10, 0, 1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)

    w = params["classifier"]["kernel"].astype(np.float64)
    g = grads["classifier"]["kernel"].astype(np.float64) + wd * w
    trust = config.optim.trust_coefficient * np.linalg.norm(w) / np.linalg.norm(g)
    assert trust < 0.01  # so the two rules below cannot be confused
    want = w - lr * (trust if mode == "distill" else 1.0) * g
    got = np.asarray(new_params["classifier"]["kernel"], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # The bias stays outside decay and trust ratio in every mode: plain momentum step.
    want_bias = params["classifier"]["bias"] - lr * grads["classifier"]["bias"]
    np.testing.assert_allclose(new_params["classifier"]["bias"], want_bias, rtol=1e-5)


def test_l2_mask_excludes_batch_norm_only():
    params, _ = _params_and_grads()
    assert {key for key, on in _flat(optim.l2_mask(params)).items() if on} == NOT_BN


def test_two_lars_steps_match_hand_computation():
    params, grads = _params_and_grads()
    lr, wd = 0.7, 1e-2
    tx = optim.lars(lr, weight_decay=wd)
    state = tx.init(params)
    want_params = _flat(params)
    velocity = {key: 0.0 for key in want_params}
    grads2 = jax.tree.map(lambda g: -0.5 * g + 0.1, grads)  # a different second gradient
    for step_grads in (grads, grads2):
        updates, state = tx.update(step_grads, state, params)
        params = optax.apply_updates(params, updates)
        want_params, velocity = _numpy_lars_step(want_params, _flat(step_grads), velocity, lr, wd)
        got = _flat(params)
        for key in want_params:
            np.testing.assert_allclose(got[key], want_params[key], rtol=1e-5, atol=1e-7)
    # Excluded leaves moved by the plain momentum rule, much further than trust-scaled kernels.
    start = _flat(_params_and_grads()[0])
    moved = {key: np.abs(got[key] - start[key]).mean() for key in got}
    assert moved[("bn", "bias")] > 30 * moved[("conv", "kernel")]
    assert moved[("classifier", "kernel")] > 30 * moved[("conv", "kernel")]


def test_lars_zero_gradient_means_trust_one_and_no_nan():
    params = {"dense": {"kernel": jnp.ones((2, 2))}}
    tx = optim.lars(0.1, weight_decay=0.0)
    updates, _ = tx.update({"dense": {"kernel": jnp.zeros((2, 2))}}, tx.init(params), params)
    np.testing.assert_array_equal(updates["dense"]["kernel"], 0.0)


def test_momentum_optimizer_decays_everything_but_batch_norm():
    params, grads = _params_and_grads()
    lr, wd, m = 0.1, 0.5, 0.9
    tx = optim.momentum_optimizer(lr, weight_decay=wd, momentum=m, nesterov=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat_p, flat_g, flat_u = _flat(params), _flat(grads), _flat(updates)
    for key in flat_p:
        g = flat_g[key] + (wd * flat_p[key] if key in NOT_BN else 0.0)
        # Nesterov from zero momentum: update = -lr * (m * g + g).
        np.testing.assert_allclose(flat_u[key], -lr * (1 + m) * g, rtol=1e-5, atol=1e-7)


def test_adam_weight_decay_is_l2_on_everything_but_batch_norm():
    params, _ = _params_and_grads()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.adam(0.1, weight_decay=0.5)
    updates = _flat(tx.update(zero_grads, tx.init(params), params)[0])
    for key, w in _flat(params).items():
        # L2 (not AdamW): the gradient is wd*w, and Adam's first step is -lr * sign(gradient).
        want = -0.1 * np.sign(w) if key in NOT_BN else np.zeros_like(w)
        np.testing.assert_allclose(updates[key], want, rtol=1e-5, atol=1e-6)


def test_warmup_cosine_schedule():
    peak, warmup, total = 2.0, 10, 110
    schedule = optim.warmup_cosine_schedule(peak, warmup, total)
    values = np.array([float(schedule(step)) for step in range(total + 5)])
    assert values[0] == 0.0
    np.testing.assert_allclose(values[5], peak * 0.5, rtol=1e-6)
    np.testing.assert_allclose(values[warmup], peak, rtol=1e-6)
    assert np.all(np.diff(values[: warmup + 1]) > 0)
    assert np.all(np.diff(values[warmup : total + 1]) < 0)
    mid = warmup + (total - warmup) // 2
    np.testing.assert_allclose(values[mid], peak / 2, rtol=1e-5)
    quarter = warmup + (total - warmup) // 4
    np.testing.assert_allclose(values[quarter], peak * 0.5 * (1 + math.cos(math.pi / 4)), 1e-5)
    assert values[total] == 0.0 and np.all(values[total:] == 0.0)
    assert float(jax.jit(schedule)(jnp.int32(total))) == 0.0


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.warmup_cosine_schedule(1.5, 0, 4)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in range(5)], [1.5, 1.28033, 0.75, 0.21967, 0.0], atol=1e-5
    )


def test_scaled_learning_rate():
    assert optim.scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert optim.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert optim.scaled_learning_rate(1.0, 512, "linear") == pytest.approx(2.0)
    assert optim.scaled_learning_rate(0.1, 512, "none") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.lr_scaling='cubic'"):
        optim.scaled_learning_rate(0.1, 512, "cubic")


def _config(**overrides):
    config = get_base_config().optim
    config.update(overrides)
    return config


@pytest.mark.parametrize("name", ["lars", "momentum", "adam"])
def test_create_optimizer_builds_each_optimizer_with_scaled_schedule(name):
    params, grads = _params_and_grads()
    tx, schedule = optim.create_optimizer(
        _config(optimizer=name, learning_rate=0.3, lr_scaling="linear"),
        batch_size=512,
        total_steps=100,
        warmup_steps=10,
    )
    np.testing.assert_allclose(float(schedule(10)), 0.6, rtol=1e-6)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    # Step 0 of the warmup has LR 0: the first update must not move anything.
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    ("overrides", "kwargs", "field"),
    [
        ({"optimizer": "sgdx"}, {}, "optim.optimizer='sgdx'"),
        ({"weight_decay": -1e-4}, {}, "optim.weight_decay"),
        ({"momentum": 1.0}, {}, "optim.momentum"),
        ({"momentum": -0.1}, {}, "optim.momentum"),
        ({"lr_scaling": "log"}, {}, "optim.lr_scaling"),
        ({"trust_coefficient": 0.0}, {}, "optim.trust_coefficient"),
        ({"learning_rate": -0.1}, {}, "optim.learning_rate"),
        ({}, {"total_steps": 0}, "total_steps"),
        ({}, {"warmup_steps": 200}, "warmup_steps"),
        ({}, {"warmup_steps": -1}, "warmup_steps"),
        ({}, {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_optimizer_config_raises_naming_field(overrides, kwargs, field):
    arguments = {"batch_size": 256, "total_steps": 100, "warmup_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=field.replace("[", r"\[")) as error:
        optim.create_optimizer(_config(**overrides), **arguments)
    if field == "optim.optimizer='sgdx'":
        assert "lars, momentum, adam" in str(error.value)


@pytest.mark.parametrize("name", ["lars", "momentum"])
def test_classifier_lr_scale_scales_only_the_classifier_step(name):
    params, grads = _params_and_grads()
    config = get_base_config().optim
    config.optimizer = name

    def first_update(scale):
        config.classifier_lr_scale = scale
        tx, _ = optim.create_optimizer(config, batch_size=256, total_steps=10, warmup_steps=0)
        return _flat(tx.update(grads, tx.init(params), params)[0])

    full, tenth = first_update(1.0), first_update(0.1)
    for key in full:
        factor = 0.1 if key[0] == "classifier" else 1.0
        np.testing.assert_allclose(tenth[key], factor * full[key], rtol=1e-5, atol=1e-8)
    config.classifier_lr_scale = 0.0
    with pytest.raises(ValueError, match="optim.classifier_lr_scale=0.0"):
        optim.create_optimizer(config, batch_size=256, total_steps=10, warmup_steps=0)
