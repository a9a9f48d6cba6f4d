"""NT-Xent against a float64 NumPy re-derivation, 1 vs 8 devices, memory layout, helpers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses, parallel


def reference_nt_xent(z1, z2, temperature, hidden_norm):
    """SimCLR NT-Xent from the full 2N x 2N similarity matrix, in float64 (no library code).

    Rows 0..N-1 are view 1, N..2N-1 view 2; the positive of row i is row (i + N) mod 2N.
    Each row's softmax runs over the other 2N-1 rows, in the reference's column order
    [other view | same view], so loss = mean_i CE_a(i) + mean_i CE_b(i).
    """
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    if hidden_norm:
        z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
        z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    n = len(z1)
    z = np.concatenate([z1, z2])
    sim = z @ z.T / temperature
    np.fill_diagonal(sim, -np.inf)
    positive = (np.arange(2 * n) + n) % (2 * n)
    shifted = sim - sim.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    per_row = -log_prob[np.arange(2 * n), positive]
    loss = per_row[:n].mean() + per_row[n:].mean()

    ab = sim[:n, n:]
    p_ab = np.exp(ab - ab.max(axis=1, keepdims=True))
    p_ab /= p_ab.sum(axis=1, keepdims=True)
    entropy = -(p_ab * np.log(p_ab)).sum(axis=1).mean()
    accuracy = (ab.argmax(axis=1) == np.arange(n)).mean()
    return loss, accuracy, entropy


def _mesh(num_devices):
    return parallel.create_mesh(devices=jax.devices()[:num_devices])


def _put(mesh, *arrays):
    sharding = parallel.batch_sharding(mesh)
    return [jax.device_put(a, sharding) for a in arrays]


def _views(batch, dim, seed, correlated=True):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(batch, dim)).astype(np.float32)
    # Correlated views make accuracy non-trivial (neither 0 nor 1 for every case).
    noise = 1.5 if correlated else 10.0
    z2 = (z1 + noise * rng.normal(size=(batch, dim))).astype(np.float32)
    return z1, z2


@pytest.mark.parametrize("batch", [2, 8, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("hidden_norm", [True, False])
def test_nt_xent_matches_numpy_reference(batch, temperature, hidden_norm):
    z1, z2 = _views(batch, 8, seed=batch)
    if not hidden_norm:
        z1, z2 = z1 * 0.3, z2 * 0.3  # keeps unnormalized logits in a finite range
    mesh = _mesh(2 if batch == 2 else 8)
    loss, metrics = jax.jit(
        lambda a, b: losses.nt_xent(a, b, mesh, temperature=temperature, hidden_norm=hidden_norm)
    )(*_put(mesh, z1, z2))
    want_loss, want_acc, want_entropy = reference_nt_xent(z1, z2, temperature, hidden_norm)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["contrast_acc"], want_acc, atol=1e-6)
    np.testing.assert_allclose(metrics["contrast_entropy"], want_entropy, rtol=1e-5, atol=1e-5)


def test_local_loss_without_axis_equals_reference():
    z1, z2 = _views(6, 4, seed=3)
    loss, metrics = losses.nt_xent_local(z1, z2, temperature=0.2, hidden_norm=True)
    want_loss, want_acc, want_entropy = reference_nt_xent(z1, z2, 0.2, True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrast_acc"], want_acc, atol=1e-6)
    np.testing.assert_allclose(metrics["contrast_entropy"], want_entropy, rtol=1e-5)


def _loss_metrics_and_grads(mesh, z1, z2, temperature=0.5):
    def loss_fn(a, b):
        return losses.nt_xent(a, b, mesh, temperature=temperature)

    a, b = _put(mesh, z1, z2)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        a, b
    )
    return loss, metrics, grads


def test_eight_devices_match_one_device_in_loss_metrics_and_gradients():
    z1, z2 = _views(32, 16, seed=7)
    loss8, metrics8, grads8 = _loss_metrics_and_grads(_mesh(8), z1, z2)
    loss1, metrics1, grads1 = _loss_metrics_and_grads(_mesh(1), z1, z2)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for name in ("contrast_acc", "contrast_entropy"):
        np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5)
    for g8, g1 in zip(grads8, grads1, strict=True):
        assert g8.shape == z1.shape
        assert np.abs(np.asarray(g1)).max() > 1e-3  # a real gradient, not all zeros
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences_of_reference():
    z1, z2 = _views(8, 4, seed=11)
    mesh = _mesh(8)
    _, _, (g1, _) = _loss_metrics_and_grads(mesh, z1, z2, temperature=0.5)
    eps = 1e-6
    for row, col in [(0, 0), (3, 2), (7, 1)]:
        plus, minus = z1.astype(np.float64), z1.astype(np.float64)
        plus[row, col] += eps
        minus[row, col] -= eps
        numeric = (
            reference_nt_xent(plus, z2, 0.5, True)[0] - reference_nt_xent(minus, z2, 0.5, True)[0]
        ) / (2 * eps)
        np.testing.assert_allclose(g1[row, col], numeric, rtol=1e-4, atol=1e-6)


def _f32_matrix_shapes(compiled_text):
    return set(re.findall(r"f32\[(\d+),(\d+)\]", compiled_text))


def _compile_loss(mesh, z1, z2):
    a, b = _put(mesh, z1, z2)
    fn = jax.jit(lambda a, b: losses.nt_xent(a, b, mesh, temperature=0.1))
    return fn.lower(a, b).compile()


def test_eight_device_loss_never_builds_full_logits():
    batch, dim = 512, 16
    z1, z2 = _views(batch, dim, seed=0)
    local = batch // 8
    full_bytes = 4 * (2 * batch) ** 2
    big = {(str(r), str(c)) for r in (batch, 2 * batch) for c in (batch, 2 * batch)}

    compiled8 = _compile_loss(_mesh(8), z1, z2)
    shapes8 = _f32_matrix_shapes(compiled8.as_text())
    assert not shapes8 & big, f"full-batch logits on one device: {shapes8 & big}"
    assert {(str(local), str(batch)), (str(local), str(2 * batch))} & shapes8

    # The same check fails on one device, where the full matrix is unavoidable.
    compiled1 = _compile_loss(_mesh(1), z1, z2)
    assert _f32_matrix_shapes(compiled1.as_text()) & big

    temp8 = compiled8.memory_analysis().temp_size_in_bytes
    temp1 = compiled1.memory_analysis().temp_size_in_bytes
    assert temp8 < full_bytes / 2, (temp8, full_bytes)
    assert temp1 >= full_bytes, (temp1, full_bytes)


def test_bfloat16_inputs_give_float32_loss_close_to_float32():
    z1, z2 = _views(64, 32, seed=5)
    mesh = _mesh(8)
    loss_fn = jax.jit(lambda a, b: losses.nt_xent(a, b, mesh, temperature=0.1))
    loss32, metrics32 = loss_fn(*_put(mesh, z1, z2))
    loss16, metrics16 = loss_fn(*_put(mesh, z1.astype(jnp.bfloat16), z2.astype(jnp.bfloat16)))
    assert loss16.dtype == jnp.float32
    assert metrics16["contrast_entropy"].dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    np.testing.assert_allclose(metrics16["contrast_entropy"], metrics32["contrast_entropy"], 2e-2)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_non_positive_temperature_raises(temperature):
    z1, z2 = _views(8, 4, seed=0)
    with pytest.raises(ValueError, match="loss.temperature"):
        losses.nt_xent(z1, z2, _mesh(8), temperature=temperature)


def test_bad_shapes_raise():
    mesh = _mesh(8)
    with pytest.raises(ValueError, match="equal shape"):
        losses.nt_xent(np.zeros((8, 4)), np.zeros((8, 5)), mesh, temperature=0.1)
    with pytest.raises(ValueError, match="divisible"):
        losses.nt_xent(np.ones((12, 4)), np.ones((12, 4)), mesh, temperature=0.1)


def test_softmax_cross_entropy_and_masked_mean():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2, 1, 3])
    shifted = logits - logits.max(1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    per_example = -log_prob[np.arange(6), labels]
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, labels, 5), per_example.mean(), rtol=1e-6
    )
    mask = np.array([1, 0, 1, 1, 0, 0], np.float32)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, labels, 5, mask=mask),
        per_example[mask > 0].mean(),
        rtol=1e-6,
    )
    assert losses.softmax_cross_entropy(logits, labels, 5, mask=np.zeros(6)) == 0.0


def test_topk_correct():
    logits = np.array([[0.1, 0.5, 0.2, 0.9], [3.0, 2.0, 1.0, 0.0], [0.0, 0.1, 0.3, 0.2]])
    labels = np.array([1, 2, 0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 3), [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 4), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="k=5"):
        losses.topk_correct(logits, labels, 5)
