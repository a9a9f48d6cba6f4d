"""The TPU pod launcher's dry runs print well-formed gcloud command lines."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).parents[1] / "launch" / "tpu.py"
POD = ["--name", "simclr-v4", "--zone", "us-central2-b", "--project", "my-proj"]


def dry_run(*args: str) -> list[list[str]]:
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), *args, "--dry_run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, str(LAUNCHER), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("create", "install", "run", "logs", "delete"):
        assert name in out


def test_create_v4_32_spot():
    [cmd] = dry_run("create", *POD, "--accelerator", "v4-32", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "simclr-v4"]
    assert {"--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base", "--spot"} <= set(cmd)  # fmt: skip


def test_create_queued_spot_resource():
    [cmd] = dry_run("create", *POD, "--accelerator", "v4-32", "--spot", "--queued")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--node-id=simclr-v4", "--runtime-version=tpu-ubuntu2204-base", "--spot",
            "--accelerator-type=v4-32"} <= set(cmd)  # fmt: skip


def test_install_copies_and_installs_on_all_workers():
    archive, scp, ssh = dry_run("install", *POD)
    assert archive[:2] == ["git", "archive"]
    assert scp[4] == "scp" and "--worker=all" in scp
    assert ssh[4] == "ssh" and "--worker=all" in ssh
    assert "pip install" in ssh[-1] and ".[tpu]" in ssh[-1]


def test_run_starts_the_config_on_all_workers_with_overrides():
    [cmd] = dry_run(
        "run", *POD, "--config", "configs/imagenet_pretrain.py:r50_1x",
        "--workdir", "gs://bucket/run1", "--tfds_data_dir", "gs://bucket/tfds",
        "--config.train_epochs=10",
    )  # fmt: skip
    assert cmd[4] == "ssh" and "--worker=all" in cmd
    remote = cmd[-1].removeprefix("--command=")
    inner = shlex.split(remote)
    assert "--config=configs/imagenet_pretrain.py:r50_1x" in inner
    assert "--workdir=gs://bucket/run1" in inner
    assert "--config.train_epochs=10" in inner
    assert "TFDS_DATA_DIR=gs://bucket/tfds" in inner


def test_logs_and_delete():
    [logs] = dry_run("logs", *POD)
    assert "--worker=0" in logs and "tail" in logs[-1]
    [delete] = dry_run("delete", *POD)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "simclr-v4"]
    [qdelete] = dry_run("delete", *POD, "--queued")
    assert qdelete[3:5] == ["queued-resources", "delete"] and "--force" in qdelete


def test_unknown_generation_is_a_clear_error():
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "create", *POD, "--accelerator", "v9-8", "--dry_run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unknown TPU generation 'v9'" in result.stderr


@pytest.mark.parametrize("sub", ["run"])
def test_local_workdir_warns(sub):
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), sub, *POD, "--config", "c.py", "--workdir", "/tmp/x",
         "--dry_run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "not a gs:// path" in result.stderr


SIMULATOR = Path(__file__).parents[1] / "launch" / "simulate_pod.py"


def test_simulated_pod_dry_run_prints_one_command_per_process():
    out = subprocess.run(
        [sys.executable, str(SIMULATOR), "--num_processes", "2", "--devices_per_process", "4",
         "--config", "configs/smoke.py:pretrain", "--workdir", "/tmp/pod", "--port", "12345",
         "--dry_run", "--", "--config.train_steps=8"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [shlex.split(line) for line in out.splitlines()]
    assert len(lines) == 2
    for pid, cmd in enumerate(lines):
        assert cmd[0] == "XLA_FLAGS=--xla_force_host_platform_device_count=4"
        # each process is simclr_jax.main behind the simulator's socket-tuning worker mode
        assert cmd[2:6] == [
            str(SIMULATOR.resolve()),
            "--worker",
            f"--socket_buffer_bytes={4 << 20}",
            "--",
        ]
        assert {"--config=configs/smoke.py:pretrain", "--workdir=/tmp/pod",
                "--coordinator_address=127.0.0.1:12345", "--num_processes=2",
                f"--process_id={pid}", "--config.train_steps=8"} <= set(cmd)  # fmt: skip


def test_simulated_pod_help():
    out = subprocess.run(
        [sys.executable, str(SIMULATOR), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--num_processes" in out and "--dry_run" in out
