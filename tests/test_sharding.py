"""A small SimCLR model's forward/backward is the same function of the global batch on 1 and
8 devices: equal loss, parameter gradients and (global, not per-device) BN batch statistics;
and the CPU im2col conv kernel gradient (models/conv.py) gives XLA's gradients on both."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import config as schema
from simclr_jax import losses, parallel
from simclr_jax.models import create_model

NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES = 16, 16, 10


def tiny_model_config(**overrides):
    config = schema.get_base_config().model
    # The standard stem, not 'auto' (which picks the CIFAR stem at 16 px): with the CIFAR stem's
    # 16x16 maps even a permuted batch order on one device moves stage-1 gradients by ~5e-4
    # of their scale at random init, more than 1-vs-8-device reduction order should be allowed.
    config.update(
        resnet_depth=18, proj_out_dim=32, num_proj_layers=2, cifar_stem=False, **overrides
    )
    return config


def grad_fn_on(mesh, variables, **model_overrides):
    """jit of value_and_grad of the contrastive + probe loss, batch sharded over the mesh."""
    model = create_model(tiny_model_config(**model_overrides), num_classes=NUM_CLASSES)

    def loss_fn(params, views, view_labels):
        out, updated = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            views,
            train=True,
            mutable=["batch_stats"],
        )
        z = out["z"].reshape(NUM_IMAGES, 2, -1)
        contrast, _ = losses.nt_xent(z[:, 0], z[:, 1], mesh, temperature=0.2)
        probe = losses.softmax_cross_entropy(out["logits"], view_labels, NUM_CLASSES)
        return contrast + probe, updated["batch_stats"]

    return jax.jit(
        jax.value_and_grad(loss_fn, has_aux=True),
        in_shardings=(parallel.replicated(mesh), *[parallel.batch_sharding(mesh)] * 2),
        out_shardings=parallel.replicated(mesh),
    )


def views_and_labels(images, labels):
    """The step's interleaved batch: (2N, H, W, 3) views and a label per view."""
    return images.reshape(2 * NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), np.repeat(labels, 2)


def gradients_on(devices, variables, images, labels, **model_overrides):
    """(loss, parameter gradients, updated batch stats) with the batch sharded over devices."""
    grad_fn = grad_fn_on(parallel.create_mesh(devices=devices), variables, **model_overrides)
    (loss, stats), grads = grad_fn(variables["params"], *views_and_labels(images, labels))
    return jax.device_get((loss, grads, stats))


def make_inputs():
    """(variables with every BN gamma 1, images (N, 2, H, W, 3), labels)."""
    rng = np.random.default_rng(0)
    images = rng.random((NUM_IMAGES, 2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32)
    model = create_model(tiny_model_config(), num_classes=NUM_CLASSES)
    variables = model.init(jax.random.key(0), jnp.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3)))
    # Zero-initialized last-BN gammas would give the residual branches' convs zero gradient;
    # ones make every gradient in the tree non-trivial.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if jax.tree_util.keystr(path).endswith("['scale']") else x,
        variables["params"],
    )
    return {"params": params, "batch_stats": variables["batch_stats"]}, images, labels


def assert_same_step(expected, actual):
    """Equal loss, non-zero and equal parameter gradients, equal BN batch statistics."""
    (loss, grads, stats), (other_loss, other_grads, other_stats) = expected, actual
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    for (path, g), other_g in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(other_grads), strict=True
    ):
        scale = float(np.abs(g).max())
        assert scale > 0, f"gradient of {jax.tree_util.keystr(path)} is zero"
        # Summation order differs across shards; observed worst case ~1.2e-5 x the scale.
        np.testing.assert_allclose(
            other_g, g, rtol=1e-4, atol=5e-5 * scale, err_msg=jax.tree_util.keystr(path)
        )
    for s, other_s in zip(jax.tree.leaves(stats), jax.tree.leaves(other_stats), strict=True):
        np.testing.assert_allclose(other_s, s, rtol=1e-5, atol=1e-6)


def test_gradients_and_batch_stats_equal_on_1_and_8_devices(devices):
    variables, images, labels = make_inputs()
    assert_same_step(
        gradients_on(devices[:1], variables, images, labels),
        gradients_on(devices, variables, images, labels),
    )


@pytest.mark.parametrize("num_devices", [1, 8])
def test_im2col_kernel_gradient_gives_the_xla_step(devices, num_devices):
    inputs = make_inputs()
    assert_same_step(
        gradients_on(devices[:1], *inputs, conv_kernel_grad="xla"),
        gradients_on(devices[:num_devices], *inputs, conv_kernel_grad="im2col"),
    )


def loop_bodies(hlo: str) -> dict[str, str]:
    """{name: text} of every computation an HLO module runs as a while-loop body."""
    names = set(re.findall(r"\bbody=%?([\w.\-]+)", hlo))
    bodies = {}
    for block in re.split(r"\n(?=\S)", hlo):  # computations start at column 0
        header = re.match(r"%?([\w.\-]+) ", block)
        if header and header.group(1) in names:
            bodies[header.group(1)] = block
    assert names <= set(bodies), f"loop bodies not found in the HLO: {names - set(bodies)}"
    return bodies


def test_im2col_step_keeps_collectives_out_of_loops(devices):
    """The im2col kernel gradient's scan holds per-device partial sums, reduced once after the
    loop. An all-reduce inside the loop ran beside the step's other all-reduces, the devices
    entered them in different orders and the 8-device step deadlocked (tests hung in CI)."""
    variables, images, labels = make_inputs()
    mesh = parallel.create_mesh(devices=devices)
    grad_fn = grad_fn_on(mesh, variables, conv_kernel_grad="im2col")
    hlo = grad_fn.lower(variables["params"], *views_and_labels(images, labels)).compile().as_text()
    bodies = loop_bodies(hlo)
    assert bodies, "expected a scan: the stem's kernel gradient has 2 chunks of 1,024 rows"
    collectives = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    for name, body in bodies.items():
        found = [op for op in collectives if op in body]
        assert not found, f"loop body {name} runs {found}"
    assert "all-reduce" in hlo  # the gradients are still reduced over the devices
