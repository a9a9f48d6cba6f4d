"""Meshes over several slices (parallel.create_mesh): hybrid, ICI inside a slice and DCN
across, with `data` spanning every device. On one slice of CPU devices the mesh is the one it
always was; TPU topologies from libtpu (no TPU needed) show the layouts; two processes standing
for two slices (tests/multislice_worker.py) train exactly as one process with 8 devices."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import preflight
from jax.experimental import mesh_utils
from pod_worker import free_port, wait_all, worker_env

from simclr_jax import parallel

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multislice_worker.py"
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


@pytest.mark.slow
def test_two_slices_train_as_one_mesh_of_eight(tmp_path):
    """2 processes, each one slice of 4 CPU devices (a hybrid mesh over process granules),
    against one process with 8 devices on one slice; all three run at once. The reference uses
    the same collectives library (gloo) as the two slices: XLA's in-process all-reduce adds the
    devices' partial gradients in another order, which float32 rounding shows at ~1.5e-5 of a
    gradient's scale, and would hide what this test looks for."""
    ports, procs = {"one_slice": free_port(), "two_slices": free_port()}, []
    runs = [("one_slice", 1, 0, 8, 1), ("two_slices", 2, 0, 4, 2), ("two_slices", 2, 1, 4, 2)]
    for name, processes, pid, devices, slices in runs:
        log = open(tmp_path / f"{name}{pid}.log", "w")
        argv = [sys.executable, str(WORKER), str(tmp_path / f"{name}.npz"), str(processes),
                str(pid), str(ports[name]), str(devices), str(slices)]  # fmt: skip
        procs.append(subprocess.Popen(argv, env=worker_env(devices), stdout=log, stderr=log))
    codes = wait_all(procs, timeout=900)
    logs = [p.read_text()[-4000:] for p in sorted(tmp_path.glob("*.log"))]
    assert codes == [0, 0, 0], "\n=====\n".join(logs)
    one, pod = (dict(np.load(tmp_path / f"{name}.npz")) for name in ("one_slice", "two_slices"))

    assert pod["mesh_shape"].tolist() == [8, 1]
    assert pod["mesh_processes"].tolist() == [0] * 4 + [1] * 4  # slice-major data axis
    assert one["mesh_processes"].tolist() == [0] * 8
    assert sorted(pod) == sorted(one)
    names = [k for k in one if not k.startswith("mesh_")]
    assert {k.split("[")[0] for k in names} == {"loss", "grads", "batch_stats", "params"}
    worst = {}  # largest difference, relative to the array's largest magnitude
    for name in names:
        expected, actual = one[name], pod[name]
        scale = float(np.abs(expected).max())
        if name.startswith("grads"):
            assert scale > 0, f"{name} is zero"
        worst[name] = float(np.abs(actual - expected).max()) / max(scale, 1e-30)
    largest = {
        prefix: max((v, k) for k, v in worst.items() if k.startswith(prefix))
        for prefix in ("loss", "grads", "batch_stats", "params")
    }
    print(f"largest |2 slices - 1 slice| / scale, of {len(worst)} arrays: {largest}")
    # A per-slice loss (negatives from one slice only) or per-slice BatchNorm statistics
    # would be off by O(1).
    assert all(value <= 1e-6 for value, _ in largest.values()), largest


# ------------------------------------------------------------------ the preflight


@pytest.mark.parametrize(
    "line,groups",
    [
        ("replica_groups={{0,1},{2,3}}, to_apply=%add", [[0, 1], [2, 3]]),
        ("replica_groups=[2,4]<=[8], to_apply=%add", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("replica_groups=[2,4]<=[2,2,2]T(2,1,0)", [[0, 4, 2, 6], [1, 5, 3, 7]]),
        ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
        ("replica_groups={}, to_apply=%add", None),
    ],
)
def test_collective_device_groups_are_read_from_the_hlo(line, groups):
    from simclr_jax.preflight import collectives

    assert collectives.device_groups(f"%x = f32[8]{{0}} all-reduce(%y), {line}") == groups


def test_a_collective_is_dcn_when_a_group_spans_slices():
    from types import SimpleNamespace

    from simclr_jax.preflight import collectives

    devices = [SimpleNamespace(slice_index=i // 4) for i in range(8)]
    hlo = """ENTRY %main (a: f32[8]) -> f32[16] {
  %s = (f32[8]{0}, f32[16]{0}) all-gather-start(f32[8]{0} %a), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}
  %g = f32[16]{0} all-gather-done((f32[8]{0}, f32[16]{0}) %s)
  %r = f32[16]{0} all-reduce(f32[16]{0} %g), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %t = f32[16]{0} all-reduce(f32[16]{0} %r), replica_groups={}, to_apply=%add
  %x = token[] after-all()
  ROOT %send = (f32[4,2]{1,0}, u32[], token[]) send(%t, %x), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
}"""  # noqa: E501
    found = collectives.parse_collectives(hlo)
    collectives.by_network(found, devices)
    assert [(c["kind"], c["network"], c["slices"], c["bytes"]) for c in found] == [
        ("all-gather", "dcn", 2, 64), ("all-reduce", "ici", 1, 64), ("all-reduce", "dcn", 2, 64),
        ("all-reduce", "dcn", 2, 32),  # libtpu's per-slice program: a megascale transfer
    ]  # fmt: skip
    # (n-1)/n of an all-gather's bytes, 2(n-1)/n of an all-reduce's, for n = 2 slices
    assert [c["dcn_bytes"] for c in found] == [32, 0, 64, 32]
    assert collectives.sum_by_kind(found, "dcn") == {"all-gather": 64, "all-reduce": 96}
    assert collectives.sum_by_kind(found, "ici") == {"all-reduce": 64}


def test_tpu7x_is_named_as_gcloud_and_gke_name_it(topology):
    from simclr_jax import preflight as pf

    tpu = pf.parse_accelerator_type("tpu7x-8")  # TensorCores, as xpk and the GKE docs count
    assert (tpu.chips, tpu.topology_name, tpu.num_devices) == (4, "TPU7x:2x2x1", 8)
    devices = pf.slice_devices(tpu)  # what libtpu describes: 2 devices per chip
    assert len(devices) == 8 and devices[0].device_kind == "TPU7x"
    assert tpu.hbm_bytes_per_device == 96 * 2**30  # 192 GiB per chip, half per TensorCore
    assert pf.parse_accelerator_type("tpu7x-128").topology_name == "TPU7x:4x4x4"
    with pytest.raises(ValueError, match="'tpu7x-6' is not a known accelerator type"):
        pf.parse_accelerator_type("tpu7x-6")


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--tpu=v5litepod-4", "--num_slices=0"], 2, "--num_slices=0 must be a positive"),
        (["--tpu=v5litepod-4", "--num_slices=2", "--config.train_batch_size=12"], 2,
         "train_batch_size=12 is not divisible by the 8 devices on the 'data' mesh axis "
         "(2 slices x 4); use a multiple of 8."),
    ],
)  # fmt: skip
def test_preflight_bad_multislice_input_is_one_line(topology, args, code, message):
    result = preflight("--config=configs/smoke.py:pretrain", *args)
    assert result.returncode == code, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert message in line


def test_smoke_step_compiles_for_two_v5e_slices_with_dcn_collectives(topology, tmp_path):
    out = tmp_path / "report.json"
    result = preflight(
        "--config=configs/smoke.py:pretrain", "--tpu=v5litepod-4", "--num_slices=2",
        f"--out={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["tpu"] == "2 x v5litepod-4" and report["num_slices"] == 2
    assert report["num_devices"] == 8 and report["fits"]
    networks = {c["network"] for c in report["collectives"]}
    assert "dcn" in networks, report["collectives"]
    dcn, ici = report["collective_bytes_dcn"], report["collective_bytes_ici"]
    # The gradients are summed over both slices, and NT-Xent gathers z from both: libtpu does
    # each in stages, inside a slice over ICI and between the slices over DCN.
    assert dcn.get("all-reduce", 0) > 0 and dcn.get("all-gather", 0) > 0, dcn
    assert ici.get("all-gather", 0) > 0, ici
    gradient_bytes = report["state_bytes_whole"] / 2  # LARS: params + one momentum each
    assert sum(dcn.values()) >= gradient_bytes / 4 * 0.9  # at least each device's quarter
    assert report["dcn_gbits_per_s_per_host"] == 100  # 25 Gb/s per chip x 4 chips per host
    assert report["dcn_send_bytes_per_step_per_host"] > 0 and report["dcn_seconds_estimate"] > 0
    assert "docs.cloud.google.com/tpu/docs/v5e" in report["dcn_bandwidth_source"]
    assert "over DCN (between slices): all-" in result.stdout


def test_smoke_step_compiles_for_a_tpu7x_slice(topology, tmp_path):
    out = tmp_path / "report.json"
    result = preflight("--config=configs/smoke.py:pretrain", "--tpu=tpu7x-8", f"--out={out}")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["topology"] == "TPU7x:2x2x1" and report["device_kind"] == "TPU7x"
    assert report["num_devices"] == 8 and report["fits"] and report["flops_per_step"] > 0
    assert report["hbm_per_chip_gib"] == 96  # per JAX device: one TensorCore, half a chip
    assert {c["network"] for c in report["collectives"]} == {"ici"}


@pytest.mark.parametrize(
    "environ,multihost",
    [
        ({}, False),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
        # A multislice of one-host slices: one hostname per slice, JAX joins them over DCN.
        ({"TPU_WORKER_HOSTNAMES": "localhost", "MEGASCALE_NUM_SLICES": "2"}, True),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "jobset-0-0.jobset:8080"}, True),
        ({"MEGASCALE_NUM_SLICES": "1"}, False),
    ],
)
def test_a_multislice_starts_jax_distributed_from_its_environment(environ, multihost):
    assert parallel._on_multihost_tpu_vm(environ) is multihost


@pytest.mark.slow
def test_resnet50_v2_at_4096_fits_two_v5litepod_256(topology, tmp_path):
    """The paper's v2 recipe on 512 v5e chips in 2 slices (libtpu compiles one slice's
    program; minutes on 2 CPU cores)."""
    out = tmp_path / "report.json"
    result = preflight(
        "--config=configs/imagenet_pretrain.py:r50_1x,v2", "--tpu=v5litepod-256",
        "--num_slices=2", f"--out={out}", timeout=1800,
    )  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["fits"] and report["global_batch"] == 4096 and report["num_devices"] == 512
    assert report["bytes_per_chip"]["total"] < 16 * 2**30
    gradient_bytes = report["state_bytes_whole"] / 2  # LARS: params + one momentum each
    # Each device's part of the gradient crosses DCN once per step, beside the ICI stages.
    assert sum(report["collective_bytes_dcn"].values()) >= gradient_bytes / 256 * 0.9
    assert report["collective_bytes_ici"] and report["dcn_seconds_estimate"] > 0
