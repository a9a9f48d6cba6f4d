"""Device mesh, shardings and host-to-global batch assembly: all sharding decisions live here."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def create_mesh(
    data: int = -1,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
    num_slices: int = 0,
) -> Mesh:
    """Builds a (data, model) mesh; `data=-1` takes every device the model axis leaves.

    Inside a slice the device order follows the ICI topology (mesh_utils.create_device_mesh;
    on CPU and GPU that is the given order). Over several slices the mesh is hybrid: each
    slice holds an equal block of the `data` axis, slices meet over DCN, the `model` axis stays
    inside a slice, and `data` still spans every device, so NT-Xent's all-gather and BatchNorm
    see the whole global batch. `num_slices=0` takes the slices the devices carry
    (`slice_index`, set on a TPU multislice), else one; devices without `slice_index`
    (CPU, GPU) stand for `num_slices` slices by process (one process per slice).
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = slice_groups(devices, num_slices)
    per_slice = len(devices) // len(slices)
    if model < 1 or per_slice % model:
        where = f"the {per_slice} devices of each of {len(slices)} slices"
        raise ValueError(
            f"mesh.model={model} must be a positive divisor of "
            f"{where if len(slices) > 1 else f'the {len(devices)} devices'}."
        )
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ValueError(
            f"mesh.data={data} x mesh.model={model} must equal the number of devices "
            f"({len(devices)}); set mesh.data=-1 to use all of them."
        )
    ici_shape = (data // len(slices), model)
    if len(slices) == 1:
        grid = _slice_grid(ici_shape, devices)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape,
            (len(slices), 1),
            devices,
            process_is_granule=slice_key(devices, num_slices) == "process_index",
            allow_split_physical_axes=True,
        )
    # Auto axes: jit propagates shardings (GSPMD) and BatchNorm statistics over the
    # sharded batch are global without any explicit collective in the model.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def _has_slice_index(devices: Sequence[jax.Device]) -> bool:
    return all(getattr(d, "slice_index", None) is not None for d in devices)


def slice_key(devices: Sequence[jax.Device], num_slices: int = 0) -> str | None:
    """The device attribute that tells the slices apart: `slice_index` on a TPU multislice;
    `process_index` where the devices are not TPUs and carry no such distinction (CPU and GPU
    give every device slice 0) but `num_slices` > 1 asks for a simulated multislice; None for
    one slice. ValueError naming mesh.num_slices for a value that is not a count."""
    if not isinstance(num_slices, (int, np.integer)) or num_slices < 0:
        raise ValueError(
            f"mesh.num_slices={num_slices!r} must be 0 (the slices the devices carry) or a "
            "positive number of slices."
        )
    if _has_slice_index(devices) and len({d.slice_index for d in devices}) > 1:
        return "slice_index"
    if num_slices <= 1 or any(d.platform == "tpu" for d in devices):
        return None
    return "process_index"


def slice_groups(devices: Sequence[jax.Device], num_slices: int = 0) -> list[list[jax.Device]]:
    """The devices of each slice, in slice order (see slice_key). ValueError naming
    mesh.num_slices when the request and the devices disagree."""
    key = slice_key(devices, num_slices)
    groups: dict[int, list[jax.Device]] = {}
    for device in devices:
        groups.setdefault(getattr(device, key) if key else 0, []).append(device)
    slices = [groups[index] for index in sorted(groups)]
    if num_slices and num_slices != len(slices):
        found = (
            f"its devices belong to {len(slices)} processes, and off TPU each process stands "
            "for one slice"
            if key == "process_index" or (key is None and devices[0].platform != "tpu")
            else f"the devices belong to {len(slices)} TPU slice(s) (slice_index)"
        )
        raise ValueError(
            f"mesh.num_slices={num_slices} does not match this run: {found}; "
            f"set mesh.num_slices={len(slices)} or 0."
        )
    sizes = sorted({len(group) for group in slices})
    if len(sizes) > 1:
        raise ValueError(
            f"the {len(slices)} slices hold different numbers of devices ({sizes}); a "
            "multislice mesh needs slices of one shape."
        )
    return slices


def _slice_grid(shape: tuple[int, int], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices of one slice laid out as `shape` in ICI topology order (TPU); the given order
    elsewhere. A TPU device subset the topology helper cannot lay out keeps the given order."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError) as error:
        logging.info("mesh: keeping the devices' order (%s)", error)
        return np.asarray(devices, dtype=object).reshape(shape)


def mesh_slices(mesh: Mesh) -> int:
    """Number of TPU slices the mesh's devices span (by slice_index; 1 without it)."""
    devices = list(mesh.devices.flat)
    return len(slice_groups(devices)) if slice_key(devices) else 1


def mesh_from_config(mesh_config: Any | None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the mesh from a `config.mesh` ConfigDict (fields `data`, `model`, `num_slices`)
    over `devices` (default: all), or over all of them when there is no mesh config."""
    if mesh_config is None:
        return create_mesh(devices=devices)
    return create_mesh(
        data=mesh_config.get("data", -1),
        model=mesh_config.get("model", 1),
        devices=devices,
        num_slices=mesh_config.get("num_slices", 0),
    )


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
        slices = mesh_slices(mesh)
        where = f" ({slices} slices x {replicas // slices})" if slices > 1 else ""
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {replicas} devices on the "
            f"'{DATA_AXIS}' mesh axis{where}; use a multiple of {replicas}."
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


def _on_multihost_tpu_vm(environ: Mapping[str, str]) -> bool:
    """True on a worker of a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES, set by the TPU
    runtime and by GKE) or of a multislice (MEGASCALE_*, set by GKE's JobSet or queued
    resources; slices of one host each have a single worker hostname)."""
    slices = environ.get("MEGASCALE_NUM_SLICES", "1").strip()
    return (
        "," in environ.get("TPU_WORKER_HOSTNAMES", "")
        or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
        or (slices.isdigit() and int(slices) > 1)
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_seconds: int = 300,
    heartbeat_timeout_seconds: int = 100,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Starts multi-process JAX when the run spans hosts; returns whether it did.

    Explicit arguments (CPU/GPU clusters, the simulated pod) win; on a multi-host Cloud TPU VM
    slice JAX detects everything itself; a single host needs nothing. A process that vanishes
    later (a preempted host that never comes back) makes the others abort after
    heartbeat_timeout_seconds instead of waiting in a collective forever.
    """
    environ = dict(os.environ if environ is None else environ)
    if coordinator_address is None and num_processes is None and process_id is None:
        if not _on_multihost_tpu_vm(environ):
            return False
        jax.distributed.initialize(
            initialization_timeout=timeout_seconds,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
        return True
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            "A multi-process run needs all of coordinator_address, num_processes and "
            f"process_id; got {coordinator_address!r}, {num_processes!r}, {process_id!r}."
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id} is out of range for num_processes={num_processes}; "
            f"use 0..{num_processes - 1}."
        )
    host, port = split_address(coordinator_address)
    if process_id != 0:
        # JAX aborts the process with a bare DEADLINE_EXCEEDED when the coordinator never
        # answers; checking the port first turns that into an error that names the fix.
        wait_for_coordinator(host, port, timeout_seconds)
    # Failures past this point (a missing process, mismatched --num_processes) abort inside
    # JAX after timeout_seconds; this line is what explains them in the log.
    logging.warning(
        "Joining a %d-process run as process %d via coordinator %s; waiting up to %d s for "
        "every process. A DEADLINE_EXCEEDED abort means a process did not start or was given "
        "a different --num_processes / --coordinator_address.",
        num_processes,
        process_id,
        coordinator_address,
        timeout_seconds,
    )
    # CPU devices need a collectives backend to talk across processes (only the CPU client
    # reads this flag, so it is harmless on TPU and GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    return True


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); ValueError naming the expected form otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator_address={address!r} must be host:port, e.g. 10.0.0.2:8476 "
            "(process 0's address and a free port)."
        )
    return host.strip("[]"), int(port)


def wait_for_coordinator(host: str, port: int, timeout_seconds: float) -> None:
    """Returns once a TCP connection to the coordinator opens; TimeoutError after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no coordinator answered at {host}:{port} within {timeout_seconds} s. "
                    "Start process 0 (--process_id=0) with the same --coordinator_address, "
                    "check the address and that the port is open between hosts, or raise "
                    "--distributed_timeout_s."
                ) from error
            time.sleep(0.5)


REMOTE_PREFIXES = ("gs://", "s3://", "/gcs/")


def warn_if_host_local(workdir: str) -> str | None:
    """Warns when a multi-host run writes to a path other hosts cannot see; returns the text."""
    if jax.process_count() == 1 or str(workdir).startswith(REMOTE_PREFIXES):
        return None
    message = (
        f"workdir={workdir!r} looks host-local but this run has {jax.process_count()} "
        "processes: each host would write its own partial checkpoints. Use a shared path "
        "(gs://bucket/dir on Cloud TPU) unless this directory is a shared file system."
    )
    logging.warning(message)
    return message


def fsdp_sharding(shape: Sequence[int], mesh: Mesh, min_size: int) -> NamedSharding:
    """Shards an array's largest evenly divisible dimension over `data` if it has >= min_size
    elements (FSDP); smaller arrays (BN, biases) stay replicated where they cost nothing."""
    replicas = data_axis_size(mesh)
    if min_size <= 0 or replicas == 1 or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % replicas == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int = 0) -> Any:
    """Shardings for a train state (params, optimizer state): replicated, or FSDP when
    `fsdp_min_size` > 0. The step function is the same either way; jit inserts the gathers."""
    return jax.tree.map(
        lambda leaf: fsdp_sharding(getattr(leaf, "shape", ()), mesh, fsdp_min_size),
        abstract_state,
    )
