"""FSDP (parameters and optimizer state sharded over 'data') is the same training step as
replication, and cuts the per-device parameter memory of a large model to about 1/8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import imagenet_pretrain, smoke
from simclr_jax import loop, modes, parallel, step, train_state
from simclr_jax.models import create_model

IMAGE_SIZE, FSDP_MIN_SIZE = 16, 1024


def two_steps(fsdp_min_size, batch):
    """State and metrics after two pretraining steps of a tiny ResNet-18 on all 8 devices."""
    config = smoke.get_config("pretrain")
    config.model.num_classes = 10
    mesh = parallel.create_mesh()
    durations = loop.Durations(total_steps=10, warmup_steps=1, steps_per_epoch=1.0)
    model = create_model(config.model, num_classes=10)
    tx, schedule = loop.create_optimizer(config, durations)
    state, shardings = train_state.create_train_state(
        model, tx, mesh, image_size=IMAGE_SIZE, seed=0, fsdp_min_size=fsdp_min_size
    )
    config.loss.temperature = 0.2
    loss_fn = modes.pretrain.loss(config, model, mesh)
    train_step = step.make_step(loss_fn, tx, schedule, mesh, shardings)
    for _ in range(2):
        state, metrics = train_step(state, parallel.host_batch_to_global(batch, mesh))
    return state, metrics


@pytest.mark.slow  # two ResNet-18 step compiles: 40-100 s on 2 busy cores
def test_fsdp_and_replicated_training_agree(devices):
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((16, 2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    replicated, metrics_r = two_steps(0, batch)
    sharded, metrics_f = two_steps(FSDP_MIN_SIZE, batch)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)}
    assert PartitionSpec() in specs and len(specs) > 1  # small arrays replicated, large split
    for name in ("params", "batch_stats", "opt_state"):
        a, b = jax.device_get((getattr(replicated, name), getattr(sharded, name)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    for key in metrics_r:
        np.testing.assert_allclose(metrics_r[key], metrics_f[key], rtol=1e-5, atol=1e-6)


def per_device_bytes(abstract, shardings):
    """Argument bytes per device of a compiled function holding the tree (XLA's analysis)."""
    compiled = (
        # The function must read its arguments, or XLA drops them from the analysis.
        jax.jit(lambda tree: jax.tree.map(lambda x: 2 * x, tree), in_shardings=(shardings,))
        .lower(abstract)
        .compile()
    )
    return compiled.memory_analysis().argument_size_in_bytes


def test_fsdp_cuts_parameter_bytes_of_resnet152_3x_sk(devices):
    """The largest SimCLRv2 model: shapes only (jax.eval_shape), nothing of it is allocated."""
    config = imagenet_pretrain.get_config("r152_3x_sk")
    model = create_model(config.model, num_classes=1000)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
    )["params"]
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert num_params > 700e6
    mesh = parallel.create_mesh()
    replicated = per_device_bytes(params, parallel.state_shardings(params, mesh))
    fsdp_shardings = parallel.state_shardings(params, mesh, fsdp_min_size=2**16)
    fsdp = per_device_bytes(params, fsdp_shardings)
    assert replicated >= 4 * num_params  # float32, whole model on every device
    assert fsdp <= replicated / 4, (fsdp / 2**30, replicated / 2**30)
    # The analysis agrees with the shard shapes the shardings imply.
    shard_bytes = sum(
        4 * int(np.prod(s.shard_shape(x.shape)))
        for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(fsdp_shardings), strict=True)
    )
    assert abs(fsdp - shard_bytes) <= 0.01 * shard_bytes
