"""Mesh construction, batch-size checks and host-to-global batch assembly."""

import jax
import numpy as np
import pytest

from simclr_jax import parallel


def test_mesh_uses_all_devices_on_data_axis(devices):
    mesh = parallel.create_mesh()
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    assert parallel.data_axis_size(parallel.create_mesh(devices=devices[:1])) == 1


def test_mesh_with_model_axis(devices):
    mesh = parallel.create_mesh(data=-1, model=2)
    assert dict(mesh.shape) == {"data": 4, "model": 2}


@pytest.mark.parametrize(
    "data,model,match", [(3, 1, "mesh.data=3"), (-1, 3, "mesh.model=3"), (0, 1, "mesh.data=0")]
)
def test_bad_mesh_shapes_name_the_field(data, model, match):
    with pytest.raises(ValueError, match=match):
        parallel.create_mesh(data=data, model=model)


def test_batch_size_must_divide_over_devices():
    mesh = parallel.create_mesh()
    parallel.check_batch_size(16, mesh, "train_batch_size")
    with pytest.raises(ValueError, match="train_batch_size=12 is not divisible by the 8 devices"):
        parallel.check_batch_size(12, mesh, "train_batch_size")
    with pytest.raises(ValueError, match="positive integer"):
        parallel.check_batch_size(0, mesh, "train_batch_size")


def test_host_batch_becomes_sharded_global_array():
    mesh = parallel.create_mesh()
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
    global_batch = parallel.host_batch_to_global(batch, mesh)
    image = global_batch["image"]
    assert image.shape == (16, 3)
    assert image.sharding == parallel.batch_sharding(mesh)
    assert {shard.data.shape for shard in image.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(image), batch["image"])
    np.testing.assert_array_equal(np.asarray(global_batch["label"]), batch["label"])
    assert len(jax.devices()) == 8


def test_single_host_needs_no_distributed_start():
    assert parallel.initialize_distributed(environ={}) is False
    assert parallel.initialize_distributed(environ={"TPU_WORKER_HOSTNAMES": "localhost"}) is False


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, "needs all of"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
         r"process_id=2 is out of range for num_processes=2; use 0..1"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": -1},
         "out of range"),
    ],
)  # fmt: skip
def test_bad_distributed_arguments_fail_before_connecting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel.initialize_distributed(**kwargs, environ={})


def test_host_local_workdir_warning_only_on_multihost():
    assert parallel.warn_if_host_local("/tmp/run") is None  # one process here


def test_fsdp_shards_large_arrays_and_replicates_small_ones():
    mesh = parallel.create_mesh()
    tree = {
        "kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), np.float32),
        "odd": jax.ShapeDtypeStruct((3, 3, 7, 9), np.float32),
        "scale": jax.ShapeDtypeStruct((128,), np.float32),
    }
    shardings = parallel.state_shardings(tree, mesh, fsdp_min_size=1024)
    assert shardings["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "data")
    assert shardings["odd"].spec == jax.sharding.PartitionSpec()  # nothing divides by 8
    assert shardings["scale"].spec == jax.sharding.PartitionSpec()  # below min size
    replicated = parallel.state_shardings(tree, mesh)
    assert all(s.spec == jax.sharding.PartitionSpec() for s in replicated.values())
