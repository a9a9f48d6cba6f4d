"""Device mesh, shardings and host-to-global batch assembly: all sharding decisions live here."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def create_mesh(
    data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, model) mesh; `data=-1` takes every device the model axis leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(
            f"mesh.model={model} must be a positive divisor of the {len(devices)} devices."
        )
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ValueError(
            f"mesh.data={data} x mesh.model={model} must equal the number of devices "
            f"({len(devices)}); set mesh.data=-1 to use all of them."
        )
    # Auto axes: jit propagates shardings (GSPMD) and BatchNorm statistics over the
    # sharded batch are global without any explicit collective in the model.
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_config(mesh_config: Any | None) -> Mesh:
    """Builds the mesh from a `config.mesh` ConfigDict (fields `data`, `model`), or all devices."""
    if mesh_config is None:
        return create_mesh()
    return create_mesh(data=mesh_config.get("data", -1), model=mesh_config.get("model", 1))


def data_axis_size(mesh: Mesh) -> int:
    """Number of data-parallel replicas in the mesh."""
    return mesh.shape[DATA_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (example) dimension split over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole by every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
    """Raises a clear error unless the global batch splits evenly over devices and hosts."""
    replicas, hosts = data_axis_size(mesh), jax.process_count()
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"{field}={batch_size!r} must be a positive integer.")
    if batch_size % replicas:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {replicas} devices on the "
            f"'{DATA_AXIS}' mesh axis; use a multiple of {replicas}."
        )
    if batch_size % hosts:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {hosts} processes; "
            f"use a multiple of {hosts}."
        )


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of a batch into global arrays sharded on `data`."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }
