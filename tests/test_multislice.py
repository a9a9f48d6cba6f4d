"""Meshes over several slices (parallel.create_mesh): hybrid, ICI inside a slice and DCN
across, with `data` spanning every device. On one slice of CPU devices the mesh is the one it
always was; TPU topologies from libtpu (no TPU needed) show the layouts; two processes standing
for two slices (tests/multislice_worker.py) train exactly as one process with 8 devices."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.experimental import mesh_utils
from multislice_worker import run_steps
from pod_worker import free_port, wait_all, worker_env

from simclr_jax import parallel

WORKER = Path(__file__).resolve().parent / "multislice_worker.py"
LIBTPU_ENV = {  # what the preflight sets for libtpu on a host that is not a TPU VM
    "TPU_ACCELERATOR_TYPE": "v4-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_SKIP_MDS_QUERY": "1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


@pytest.fixture
def topology(monkeypatch):
    """topology(name, num_slices) -> the devices libtpu describes for that TPU slice."""
    if importlib.util.find_spec("libtpu") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install libtpu (requirements/lock.txt, the `test` extra)")
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.1')")
    for key, value in LIBTPU_ENV.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    from jax.experimental import topologies

    def devices(name, num_slices=1):
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=name, num_slices=num_slices
        )
        return desc.devices

    return devices


# ------------------------------------------------------------------ one slice


@pytest.mark.parametrize("model", [1, 2])
def test_one_slice_of_cpu_devices_keeps_their_order(devices, model):
    """The mesh (so the step's programs and the smoke run's params) is the plain reshape of
    jax.devices() it always was."""
    for num_slices in (0, 1):
        mesh = parallel.create_mesh(model=model, num_slices=num_slices)
        expected = np.asarray(devices, dtype=object).reshape(8 // model, model)
        assert mesh.devices.tolist() == expected.tolist()
    assert parallel.mesh_from_config(None).devices.ravel().tolist() == list(devices)


def test_one_tpu_slice_is_laid_out_by_topology(topology):
    tpus = topology("v5e:4x4")
    mesh = parallel.create_mesh(devices=tpus)
    order = [d.id for d in mesh.devices.flat]
    assert order == [d.id for d in mesh_utils.create_device_mesh((16, 1), tpus).flat]
    assert order != [d.id for d in tpus]  # libtpu's own order is not the ICI ring
    assert sorted(order) == sorted(d.id for d in tpus)
    assert parallel.mesh_slices(mesh) == 1


# ------------------------------------------------------------------ several slices


def test_two_tpu_slices_make_a_hybrid_mesh(topology):
    tpus = topology("v5e:4x4", num_slices=2)
    assert sorted({d.slice_index for d in tpus}) == [0, 1]
    for num_slices in (0, 2):  # the devices say how many slices there are
        mesh = parallel.create_mesh(devices=tpus, num_slices=num_slices)
        assert dict(mesh.shape) == {"data": 32, "model": 1}
        assert parallel.mesh_slices(mesh) == 2
        column = list(mesh.devices[:, 0])
        assert [d.slice_index for d in column] == [0] * 16 + [1] * 16  # DCN: outer
        for index, block in enumerate((column[:16], column[16:])):
            own = [d for d in tpus if d.slice_index == index]
            assert block == list(mesh_utils.create_device_mesh((16, 1), own).flat)  # ICI

    mesh = parallel.create_mesh(devices=tpus, model=2)
    assert dict(mesh.shape) == {"data": 16, "model": 2}
    for row in mesh.devices:  # the model axis never crosses DCN
        assert len({d.slice_index for d in row}) == 1
    with pytest.raises(ValueError, match=r"mesh.model=3 must be a positive divisor of the 16 "):
        parallel.create_mesh(devices=tpus, model=3)


def test_a_batch_the_slices_do_not_divide_is_one_line(topology):
    mesh = parallel.create_mesh(devices=topology("v5e:4x4", num_slices=2))
    parallel.check_batch_size(64, mesh, "train_batch_size")
    with pytest.raises(ValueError) as error:
        parallel.check_batch_size(48, mesh, "train_batch_size")
    assert str(error.value) == (
        "train_batch_size=48 is not divisible by the 32 devices on the 'data' mesh axis "
        "(2 slices x 16); use a multiple of 32."
    )


@pytest.mark.parametrize(
    "num_slices,match",
    [
        (2, r"mesh.num_slices=2 does not match this run: its devices belong to 1 processes.*"
            r"set mesh.num_slices=1 or 0"),
        (-1, r"mesh.num_slices=-1 must be 0 .* or a positive number"),
        ("2", r"mesh.num_slices='2' must be 0"),
    ],
)  # fmt: skip
def test_num_slices_the_run_cannot_have_names_the_field(num_slices, match):
    with pytest.raises(ValueError, match=match) as error:
        parallel.create_mesh(num_slices=num_slices)
    assert "\n" not in str(error.value)


def test_num_slices_must_match_the_tpu_slices(topology):
    with pytest.raises(ValueError, match=r"the devices belong to 2 TPU slice\(s\) \(slice_index\)"):
        parallel.create_mesh(devices=topology("v5e:2x2", num_slices=2), num_slices=3)


# ------------------------------------------------------------------ simulated multislice


@pytest.fixture(scope="module")
def simulated_two_slices(tmp_path_factory):
    """2 processes, each one slice of 4 CPU devices (hybrid mesh over process granules)."""
    root = tmp_path_factory.mktemp("multislice")
    out, port, procs = root / "two_slices.npz", free_port(), []
    for pid in range(2):
        log = open(root / f"process{pid}.log", "w")
        argv = [sys.executable, str(WORKER), str(out), "2", str(pid), str(port), "4", "2"]
        procs.append(subprocess.Popen(argv, env=worker_env(4), stdout=log, stderr=log))
    codes = wait_all(procs, timeout=300)
    logs = [(root / f"process{pid}.log").read_text()[-4000:] for pid in range(2)]
    assert codes == [0, 0], "\n=====\n".join(logs)
    return dict(np.load(out))


@pytest.mark.slow
def test_two_slices_train_as_one_mesh_of_eight(devices, simulated_two_slices):
    pod = simulated_two_slices
    assert pod["mesh_shape"].tolist() == [8, 1]
    assert pod["mesh_processes"].tolist() == [0] * 4 + [1] * 4  # slice-major data axis
    one = run_steps(parallel.create_mesh(devices=devices))
    assert one["mesh_processes"].tolist() == [0] * 8
    assert sorted(pod) == sorted(one)
    names = [k for k in one if not k.startswith("mesh_")]
    assert {k.split("[")[0] for k in names} == {"loss", "grads", "batch_stats", "params"}
    for name in names:
        expected, actual = one[name], pod[name]
        if name.startswith("grads"):
            assert np.abs(expected).max() > 0, f"{name} is zero"
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6, err_msg=name)
