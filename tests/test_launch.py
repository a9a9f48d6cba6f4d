"""The TPU pod launcher, executed: its shell strings are parsed and run, and a real 2-worker
CPU training goes create -> install -> run -> status -> stop -> run (resume) -> logs -> delete
through a fake `gcloud` (tests/fake_gcloud/gcloud) that runs every command on local workers."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from pod_worker import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "tpu.py"
FAKE_GCLOUD = REPO / "tests" / "fake_gcloud"
POD = ["--name", "simclr-v4", "--zone", "us-central2-b", "--project", "my-proj"]


def load_launcher():
    """launch/tpu.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("tpu_launcher", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu = load_launcher()
common = sys.modules["common"]  # launch/common.py, as the launcher imported it
STATE_DIR_ENV = tpu.STATE_DIR_ENV


STATE_DIR = Path(tempfile.mkdtemp(prefix="simclr_tpu_state_"))  # never the user's ~/.config


def launch(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Runs the launcher (stdout and stderr captured)."""
    env = {STATE_DIR_ENV: str(STATE_DIR), **(os.environ if env is None else env)}
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


def dry_run(*args: str) -> list[list[str]]:
    """The command lines a dry run prints (worker prefixes stripped)."""
    result = launch(*args, "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"^(\[worker \d+\] )?\$ ", "", line) for line in result.stdout.splitlines()]
    return [shlex.split(line) for line in lines]


def remote_command(argv: list[str]) -> str:
    [flag] = [a for a in argv if a.startswith("--command=")]
    return flag.removeprefix("--command=")


# ------------------------------------------------------------------ command lines


def test_help_lists_every_subcommand():
    out = launch("--help").stdout
    for name in ("create", "install", "run", "status", "stop", "logs", "delete"):
        assert name in out


def test_create_v4_32_spot():
    [cmd] = dry_run("create", *POD, "--accelerator", "v4-32", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "simclr-v4"]
    assert {"--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base", "--spot"} <= set(cmd)  # fmt: skip


def test_create_queued_v5e_16_spot_waits_for_active():
    create, wait = dry_run("create", *POD, "--accelerator", "v5litepod-16", "--spot", "--queued")
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--node-id=simclr-v4", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
            "--accelerator-type=v5litepod-16"} <= set(create)  # fmt: skip
    assert wait[3:5] == ["queued-resources", "describe"] and "--format=value(state.state)" in wait


def test_install_uses_a_venv_and_the_lock_on_every_worker():
    *local, ssh0, ssh1 = dry_run("install", *POD, "--num_workers", "2")
    assert [c[0] for c in local] == ["git", "git", "git", "gcloud", "gcloud"]
    assert local[2][3] == "archive" and local[2][-1] == "HEAD"
    assert local[3][4] == "scp" and local[4][5].endswith("simclr_jax_lock.txt")
    for worker, ssh in enumerate((ssh0, ssh1)):
        assert f"--worker={worker}" in ssh
        remote = remote_command(ssh)
        assert "launch/worker_setup.sh" in remote and "simclr_jax_lock.txt" in remote
        assert "requirements/tpu.txt" in remote  # libtpu on real TPU workers
        assert "pip install" not in remote  # pip runs inside the venv, in worker_setup.sh


def test_run_puts_env_before_python_and_detaches():
    *_, start0, start1 = dry_run(
        "run", *POD, "--num_workers", "2", "--config", "configs/imagenet_pretrain.py:r50_1x",
        "--workdir", "gs://bucket/run1", "--tfds_data_dir", "gs://bucket/tfds",
        "--config.train_epochs=10",
    )  # fmt: skip
    for worker, start in enumerate((start0, start1)):
        remote = remote_command(start)
        assert "setsid nohup bash -c" in remote and "< /dev/null &" in remote
        inner = shlex.split(remote.split("setsid nohup bash -c ", 1)[1])[0]
        [train] = [part for part in inner.split("; ") if "simclr_jax.main" in part]
        words = shlex.split(train)
        assert words[:2] == ["env", "TFDS_DATA_DIR=gs://bucket/tfds"]
        assert words[2].endswith("simclr_jax_venv/bin/python") and words[3:5] == [
            "-m",
            "simclr_jax.main",
        ]
        assert {"--config=configs/imagenet_pretrain.py:r50_1x", "--workdir=gs://bucket/run1",
                "--config.train_epochs=10", "--coordinator_address=WORKER0_IP:8476",
                "--num_processes=2", f"--process_id={worker}"} <= set(words)  # fmt: skip


def test_logs_follow_process_0_and_delete():
    [logs] = dry_run("logs", *POD)
    assert "--worker=0" in logs and "tail -n 100 --pid=" in remote_command(logs)
    [delete] = dry_run("delete", *POD)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "simclr-v4"]
    [qdelete] = dry_run("delete", *POD, "--queued")
    assert qdelete[3:5] == ["queued-resources", "delete"] and "--force" in qdelete


FLAG_SETS = {
    "create": [["--accelerator", "v4-32"], ["--accelerator", "v4-32", "--spot"],
               ["--accelerator", "v5litepod-16", "--queued"],
               ["--accelerator", "v5litepod-16", "--queued", "--spot"]],
    "install": [[], ["--cpu_only"], ["--pip_args", "--no-index --find-links='/a dir/wheels'"],
                ["--python_version", "3.12"]],
    "run": [["--config", "configs/smoke.py:pretrain", "--workdir", "gs://b/w"],
            ["--config", "configs/my config.py:a,b", "--workdir", "gs://b/it's here",
             "--env", "A=two words", "--env", 'B=say "hi" $HOME `x`', "--env", "C='q'",
             "--tfds_data_dir", "gs://b/t d", "--config.optim.name=it's", '--config.x="y z"'],
            ["--queued", "--config", "c.py", "--workdir", "gs://b/w", "--coordinator_port", "1"]],
    "status": [[], ["--queued"]],
    "stop": [[], ["--wait_s", "5"]],
    "logs": [[], ["--no_follow", "--lines", "5"], ["--worker", "1"]],
    "delete": [[], ["--queued"]],
}  # fmt: skip


@pytest.mark.parametrize(
    "sub,flags", [(sub, flags) for sub, sets in FLAG_SETS.items() for flags in sets]
)
def test_every_remote_shell_string_parses(sub, flags):
    commands = dry_run(sub, *POD, "--num_workers", "2", *flags)
    remotes = [remote_command(c) for c in commands if any(a.startswith("--command=") for a in c)]
    if sub in ("install", "run", "status", "stop", "logs"):
        assert remotes
    for remote in remotes:
        checked = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
        assert checked.returncode == 0, f"{remote}\n{checked.stderr}"
        if "setsid nohup bash -c " in remote:  # the detached inner script, too
            inner = shlex.split(remote.split("setsid nohup bash -c ", 1)[1])[0]
            checked = subprocess.run(["bash", "-n", "-c", inner], capture_output=True, text=True)
            assert checked.returncode == 0, f"{inner}\n{checked.stderr}"


def test_run_command_delivers_env_and_arguments_verbatim(tmp_path):
    """Executes the start command with a stand-in python: it must see exactly what was asked,
    survive its shell, and log its exit status."""
    home = tmp_path / "home dir"
    (home / "simclr_jax").mkdir(parents=True)
    fake_python = home / "simclr_jax_venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'A': os.environ.get('A'), 'B': os.environ.get('B')},"
        " open(os.path.expanduser('~/seen.json'), 'w'))\nsys.exit(3)\n"
    )
    fake_python.chmod(0o755)
    args = argparse.Namespace(
        config="configs/my config.py:a,b", workdir="gs://b/it's here",
        env=["A=two words", 'B=say "hi" $HOME `x`'], override=["--config.x=\"y z\"", "--k=it's"],
    )  # fmt: skip
    remote = tpu.run_remote(args, 1, 2, "10.0.0.2:8476")
    # The fake gsutil (gs:// as a local folder) takes the log copies of the gs:// workdir.
    env = {**os.environ, "HOME": str(home), "PATH": f"{FAKE_GCLOUD}:{os.environ['PATH']}",
           "FAKE_GCS_ROOT": str(tmp_path / "gcs")}  # fmt: skip
    started = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    pid = int((home / "simclr_jax_run.pid").read_text())
    deadline = time.monotonic() + 30
    while (home / "simclr_jax_run.log").read_text().count("=== exited") == 0:
        assert time.monotonic() < deadline, "the detached command did not finish"
        time.sleep(0.1)
    seen = json.loads((home / "seen.json").read_text())
    assert seen["A"] == "two words" and seen["B"] == 'say "hi" $HOME `x`'
    assert seen["argv"] == [
        "-m", "simclr_jax.main", "--config=configs/my config.py:a,b",
        "--workdir=gs://b/it's here", "--coordinator_address=10.0.0.2:8476",
        "--num_processes=2", "--process_id=1", '--config.x="y z"', "--k=it's",
    ]  # fmt: skip
    log = (home / "simclr_jax_run.log").read_text()
    assert "=== worker 1: start" in log and "=== exited with status 3" in log
    assert (home / "simclr_jax_run.workdir").read_text() == "gs://b/it's here\n"
    assert pid > 0


def test_a_run_slow_to_detach_survives_the_end_of_the_ssh_session(tmp_path):
    """The fake ssh sends SIGHUP to the session's process group once the start command returns.
    With setsid slowed by 2 s, as on a loaded host, the run must still start and finish: a
    worker once logged nothing but its start line because its run died before detaching."""
    root, image = tmp_path / "gcloud", tmp_path / "image"
    image.mkdir()
    slow_setsid = image / "setsid"
    slow_setsid.write_text(f'#!/bin/bash\nsleep 2\nexec {shutil.which("setsid")} "$@"\n')
    slow_setsid.chmod(0o755)
    env = {**fake_env(root), "FAKE_GCLOUD_IMAGE_PATH": str(image)}
    assert launch("create", *POD, "--accelerator", "v4-8", env=env).returncode == 0
    home = root / "nodes" / "simclr-v4" / "worker0"
    (home / "simclr_jax").mkdir()
    python = home / "simclr_jax_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/bash\necho 'training ran'\n")
    python.chmod(0o755)
    (home / "simclr_jax_venv" / "simclr_jax_installed").write_text("abc123\n")

    started = launch(
        "run", *POD, "--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
        "--skip_preflight", env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    log = home / "simclr_jax_run.log"
    wait_for(
        lambda: "=== exited" in log.read_text(), 30, f"the run's exit line in\n{log.read_text()}"
    )
    assert "training ran" in log.read_text() and "=== exited with status 0" in log.read_text()


def test_a_run_that_never_detaches_is_an_error_naming_the_log(tmp_path):
    """The start command's other branch: when the detached shell never writes its pid (here a
    setsid that fails at once), the command fails after the wait and says where to look."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "simclr_jax").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "setsid").write_text("#!/bin/bash\nexit 1\n")
    (bin_dir / "setsid").chmod(0o755)
    args = argparse.Namespace(config="c.py", workdir="/tmp/w", env=[], override=[])
    remote = tpu.run_remote(args, 0, 1, "10.0.0.2:8476", detach_wait_s=1)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "the run did not detach within 1 s" in result.stderr
    assert f"see {home}/simclr_jax_run.log" in result.stderr
    assert not (home / "simclr_jax_run.pid").exists() and "started" not in result.stdout


# ------------------------------------------------------------------ simulated pod


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


# ------------------------------------------------------------------ bad input


def test_unknown_accelerator_is_one_clear_line():
    result = launch("create", *POD, "--accelerator", "v9-8", "--dry_run")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "unknown TPU generation 'v9'" in result.stderr and "--runtime_version" in result.stderr


def test_missing_gcloud_is_one_clear_line(tmp_path):
    result = launch("status", *POD, env={**os.environ, "PATH": str(tmp_path)})
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "gcloud, which is not on PATH" in result.stderr


def fake_env(root: Path, worker_env: dict | None = None) -> dict[str, str]:
    """Environment that puts the fake gcloud first on PATH."""
    return {
        **os.environ,
        "PATH": f"{FAKE_GCLOUD}:{os.environ['PATH']}",
        "FAKE_GCLOUD_ROOT": str(root),
        STATE_DIR_ENV: str(root / "launcher_state"),
        "FAKE_GCLOUD_WORKER_ENV": json.dumps(worker_env or {}),
    }


def test_local_workdir_on_a_multi_host_slice_is_refused(tmp_path):
    env = fake_env(tmp_path)
    assert launch("create", *POD, "--accelerator", "v4-16", env=env).returncode == 0
    result = launch("run", *POD, "--config", "configs/smoke.py", "--workdir", "/tmp/x", env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "2-worker slice needs a shared gs:// workdir" in result.stderr
    assert "[worker" not in result.stdout  # nothing ran on any worker
    assert launch("delete", *POD, env=env).returncode == 0


# ------------------------------------------------------------------ executed end to end


def locked_as_installed(path: Path) -> Path:
    """requirements/lock.txt with the versions of this test environment: the workers' offline
    pip then finds every pin satisfied by the packages the tests run with."""
    installed: dict[str, str] = {}
    for d in importlib.metadata.distributions():
        # First on sys.path wins, as for imports: setuptools may put its vendored (older)
        # copies of packages such as `packaging` further down the path.
        installed.setdefault(re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(), d.version)
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    names = [line.split("==")[0] for line in lock if "==" in line]
    path.write_text("".join(f"{n}=={installed[n]}\n" for n in names if n in installed))
    return path


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def wait_for_training(workers: list[Path], timeout: float) -> None:
    """Waits for step 2 in worker 0's log. If it never comes, every worker's Python prints all
    its threads' stacks into its log (faulthandler, on SIGABRT to the run's process group) and
    the failure shows the logs: a worker once stayed silent, stuck before joining the run."""
    try:
        log0 = workers[0] / "simclr_jax_run.log"
        wait_for(lambda: "step 2/1000" in log0.read_text(), timeout, "step 2 on worker 0")
    except AssertionError as timed_out:
        for worker in workers:
            try:
                os.killpg(int((worker / "simclr_jax_run.pid").read_text()), signal.SIGABRT)
            except (OSError, ValueError):
                pass  # that worker's run has already ended
        time.sleep(10)
        logs = [f"--- {w.name}:\n{(w / 'simclr_jax_run.log').read_text()[-6000:]}" for w in workers]
        raise AssertionError("\n".join([str(timed_out), *logs])) from None


@pytest.mark.multiprocess
def test_two_worker_pod_end_to_end_through_fake_gcloud(tmp_path):
    """A real 2-process CPU training through every launcher subcommand."""
    root, image, wheels = tmp_path / "gcloud", tmp_path / "image", tmp_path / "wheels"
    for d in (root, image, wheels):
        d.mkdir()
    # The simulated VM image: a python<version> on PATH and, instead of network access,
    # the test environment's packages (pip must find every pin satisfied, with --no-index).
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (image / f"python{version}").symlink_to(Path(sys._base_executable).resolve())
    site = sysconfig.get_paths()["purelib"]
    image_env = {"PYTHONPATH": site, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                 "PYTHONFAULTHANDLER": "1"}  # fmt: skip
    env = {**fake_env(root, {"all": image_env, "1": {"PYTHONPATH": ""}}),
           "FAKE_GCLOUD_IMAGE_PATH": str(image)}  # fmt: skip
    workers = [root / "nodes" / "pod" / f"worker{w}" for w in (0, 1)]
    pod = ["--name", "pod", "--zone", "us-central2-b"]
    workdir = tmp_path / "workdir"

    created = launch("create", *pod, "--accelerator", "v4-16", "--queued", "--spot", env=env)
    assert created.returncode == 0, created.stderr
    assert json.loads((root / "nodes" / "pod.json").read_text())["spot"] is True

    install = ["install", *pod, "--cpu_only", "--python_version", version,
               "--lock", str(locked_as_installed(tmp_path / "lock.txt")),
               "--pip_args", f"--no-index --find-links={wheels}"]  # fmt: skip
    # Worker 1's image lacks the packages: install fails there, naming worker and command ...
    failed = launch(*install, env=env, timeout=600)
    assert failed.returncode == 1, failed.stdout
    [line] = failed.stderr.splitlines()
    assert line.startswith("error: worker 1: install failed (exit 1)")
    assert "gcloud compute tpus tpu-vm ssh pod --worker=1" in line and "worker_setup.sh" in line

    def run(*extra: str) -> subprocess.CompletedProcess:
        return launch(
            "run", *pod, "--config", "configs/smoke.py:pretrain", "--workdir", str(workdir),
            "--allow_local_workdir", "--skip_preflight", "--coordinator_port", str(free_port()),
            "--env", f"JAX_COMPILATION_CACHE_DIR={tmp_path / 'jax cache'}",
            "--env", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0",
            "--env", 'SIMCLR_NOTE=spaces "and" quotes',
            "--config.data.image_size=16", "--config.train_batch_size=16",
            "--config.eval_batch_size=48", "--config.data.eval_split=test[:10]",
            "--config.knn_eval=False", "--config.log_every_steps=1", "--config.warmup_steps=1",
            "--config.checkpoint_every_steps=1000", *extra, env=env,
        )  # fmt: skip

    # ... and run refuses to start anything, on worker 0 too.
    refused = run("--config.train_steps=1000")
    assert refused.returncode == 1
    assert "error: worker 1: the pre-start check failed" in refused.stderr
    assert "not installed here" in refused.stderr
    assert not (workers[0] / "simclr_jax_run.pid").exists()

    env["FAKE_GCLOUD_WORKER_ENV"] = json.dumps({"all": image_env})
    installed = launch(*install, env=env, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for w in (0, 1):
        assert f"[worker {w}] setup: done: Python {version}" in installed.stdout

    started = run("--config.train_steps=1000")
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for_training(workers, 900)

    status = launch("status", *pod, env=env)
    assert status.returncode == 0
    assert "[worker 0] running (pid" in status.stdout and "[worker 1] running (pid" in status.stdout
    assert re.search(
        r"\[worker 0\] last progress: .*step \d+/1000 \(.*images/s, ETA ", status.stdout
    )

    stopped = launch("stop", *pod, env=env, timeout=900)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    saved = int(re.search(r"last checkpoint: step (\d+)", stopped.stdout).group(1))
    assert saved >= 2
    for w in (0, 1):
        assert f"[worker {w}] stopped: === exited with status 0" in stopped.stdout
    # Process 0 alone prints progress; worker 1 has its own log.
    assert " step 2/1000 " not in (workers[1] / "simclr_jax_run.log").read_text()

    resumed = run(f"--config.train_steps={saved + 2}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    logs = launch("logs", *pod, env=env, timeout=900)  # follows until the run ends
    assert logs.returncode == 0
    log = logs.stdout[-8000:]  # shown whole when an assertion fails
    assert f"Resuming from {workdir / 'checkpoints'} step {saved}." in logs.stdout, log
    assert f"step {saved + 2}/{saved + 2} (100.0%)" in logs.stdout, log
    assert logs.stdout.rstrip().splitlines()[-1].startswith("=== exited with status 0")
    steps = [json.loads(line).get("step") for line in (workdir / "metrics.jsonl").open()]
    assert steps[-1] == saved + 2 and saved + 1 in steps
    assert (workdir / "checkpoints" / str(saved + 2)).is_dir()

    deleted = launch("delete", *pod, "--queued", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert not (root / "nodes" / "pod").exists()
    gone = launch("status", *pod, env=env)
    assert gone.returncode == 1 and "describing the TPU VM failed" in gone.stderr


# ------------------------------------------------------------------ the lock file


def setup_kwargs(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    spec = importlib.util.spec_from_file_location("project_setup", REPO / "setup.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return captured


def test_lock_pins_every_requirement_of_setup_py(monkeypatch):
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    kwargs = setup_kwargs(monkeypatch)
    assert kwargs["python_requires"] == ">=3.11"
    lock = (REPO / "requirements" / "lock.txt").read_text()
    pins = dict(
        line.split(" --hash=")[0].split("==")
        for line in lock.splitlines()
        if line and not line.startswith("#")
    )
    assert all(re.fullmatch(r"[a-z0-9-]+", name) for name in pins)
    python = re.search(r"Resolved for Python (\d+\.\d+)", lock).group(1)
    assert SpecifierSet(kwargs["python_requires"]).contains(python + ".0")
    for text in [*kwargs["install_requires"], *kwargs["extras_require"]["test"]]:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not in requirements/lock.txt; run requirements/lock.sh"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {text}"
    # libtpu is in the `test` extra (the preflight compiles for TPU in CI), so lock.txt pins it
    # for the workers too, with its hash like every line.
    assert re.search(r"^libtpu==[\d.]+ --hash=sha256:[0-9a-f]{64}$", lock, re.M)


# ------------------------------------------------------------------ worker set-up, no python3.X


FAKE_UV = """#!/bin/sh
# Stand-in for uv (no network here): `python install V` records the call, `python find V`
# answers with the interpreter the test chose.
case "$1 $2" in
  "python install") echo "fake uv: installed CPython $3"; : > "$HOME/uv-installed-$3" ;;
  "python find") echo "$FAKE_UV_PYTHON" ;;
  *) exit 2 ;;
esac
"""


def fake_uv_wheel(wheels: Path, version: str) -> None:
    """A wheel named uv==version whose `uv` script is FAKE_UV (pip installs it to ~/.local/bin)."""
    import base64
    import hashlib
    import zipfile

    files = {
        f"uv-{version}.data/scripts/uv": FAKE_UV,
        f"uv-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: uv\nVersion: {version}\n"
        ),
        f"uv-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"uv-{version}.dist-info/RECORD"] = "\n".join(
        [*record, f"uv-{version}.dist-info/RECORD,,"]
    )
    with zipfile.ZipFile(wheels / f"uv-{version}-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | 0o755) << 16  # a regular, executable file
            whl.writestr(info, text)


def test_worker_setup_fetches_python_with_uv_when_the_image_has_none(tmp_path):
    """The real TPU image path: no python3.X on PATH, so worker_setup.sh pip-installs uv, asks
    it for CPython and builds the venv from that (uv's download is faked, the commands are not)."""
    script = (REPO / "launch" / "worker_setup.sh").read_text()
    uv_version = re.search(r"^UV_VERSION=(\S+)$", script, re.M).group(1)
    home, image, wheels = tmp_path / "home", tmp_path / "image", tmp_path / "wheels"
    for d in (home, image, wheels):
        d.mkdir()
    base = Path(sys._base_executable).resolve()
    (image / "python3").symlink_to(base)  # the image's old python3, no python3.X
    fake_uv_wheel(wheels, uv_version)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {
        "HOME": str(home), "PATH": str(image), "FAKE_UV_PYTHON": str(base),
        "PYTHONPATH": sysconfig.get_paths()["purelib"], "PIP_CONFIG_FILE": os.devnull,
    }  # fmt: skip
    venv = home / "venv"
    result = subprocess.run(
        ["/bin/bash", str(REPO / "launch" / "worker_setup.sh"), str(REPO), str(venv), version,
         str(locked_as_installed(tmp_path / "lock.txt")), "-", "--", "--no-index",
         f"--find-links={wheels}"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"no python{version} on PATH; installing uv=={uv_version}" in result.stdout
    assert (home / ".local" / "bin" / "uv").exists() and (home / f"uv-installed-{version}").exists()
    assert f"virtual environment {venv} from {base}" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith(f"setup: done: Python {version}")
    assert (venv / "bin" / "python").exists()


# ------------------------------------------------------------------ the real world: supervise


STANDIN = FAKE_GCLOUD / "standin_python"
# Fast retries, the stand-in interpreter's "Python 9.9" (tests/fake_gcloud/standin_python).
QUICK = ["--retry_delay_s", "0.05"]
STANDIN_INSTALL = ["--python_version", "9.9", "--cpu_only", *QUICK]
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def standin_pod(
    tmp_path: Path, accelerator: str = "v4-8", *flags: str, worker_env: dict | None = None
) -> tuple[Path, dict[str, str], list[str]]:
    """A created slice whose image's Python is the stand-in: (fake root, env, --name flags)."""
    root, image = tmp_path / "gcloud", tmp_path / "image"
    image.mkdir()
    (image / "python9.9").symlink_to(STANDIN)
    env = {**fake_env(root, worker_env), "FAKE_GCLOUD_IMAGE_PATH": str(image)}
    created = launch("create", "--name", "pod", "--zone", "us-central2-b",
                     "--accelerator", accelerator, *flags, env=env)  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    return root, env, ["--name", "pod"]


def preempt(env: dict[str, str], name: str = "pod") -> None:
    """The cloud takes the slice back (tests/fake_gcloud/gcloud's `fake preempt`)."""
    subprocess.run([str(FAKE_GCLOUD / "gcloud"), "fake", "preempt", name], env=env, check=True)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed launcher call."""
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    return line


@pytest.mark.parametrize("queued", [False, True], ids=["spot", "queued-spot"])
def test_supervise_recreates_a_preempted_slice_and_the_run_resumes(tmp_path, queued):
    # Slow enough steps (40 x 0.5 s) that the run is still going when the log copy shows step 4.
    root, env, pod = standin_pod(tmp_path, "v4-8", "--spot", *(["--queued"] if queued else []),
                                 worker_env={"all": {"STANDIN_STEP_S": "0.5"}})  # fmt: skip
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("kept\n")
    log = tmp_path / "supervise.log"
    # The zone is out of capacity when the slice is recreated: three creates are refused.
    # Waiting for capacity is not a restart: one restart (the preemption) is all it may take.
    command = [sys.executable, str(LAUNCHER), "supervise", *pod, "--config", "configs/smoke.py",
               "--skip_preflight", "--workdir", str(workdir), "--allow_local_workdir",
               "--poll_s", "0.3", "--max_restarts", "1", "--log_copy_s", "1",
               "--capacity_retry_s", "0.1", "--capacity_retry_max_s", "0.2", *STANDIN_INSTALL,
               "--config.train_steps=40"]  # fmt: skip
    with open(log, "w") as out:
        supervisor = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), 120, "checkpoint 4")
        # Logs are copied every --log_copy_s: a preemption loses what came after the last copy.
        wait_for(lambda: any("step 4/40" in p.read_text()
                             for p in (workdir / "logs").glob("worker0-*.log")),
                 60, "the log copy at step 4")  # fmt: skip
        (root / "faults").mkdir()
        (root / "faults" / "stockout").write_text("3")
        preempt(env)
        assert supervisor.wait(timeout=300) == 0, log.read_text()
    finally:
        supervisor.kill()
    out = log.read_text()
    lines = out.splitlines()
    assert all(TIMESTAMPED.match(line) for line in lines), out
    # (a queued slice may be seen between its node's and its queued resource's change)
    gone = (
        "(queued resource pod-qr is SUSPENDED|node pod is PREEMPTED)"
        if queued
        else ("node pod is PREEMPTED")
    )
    assert re.search(f"restart 1/1: {gone}; recreating it and resuming the run", out), out
    assert "restart 2/" not in out and "gave up" not in out, out
    tries = re.findall(r"no capacity for v4-8 in us-central2-b \(try (\d): .*RESOURCE_EXHAUSTED"
                       r".*\); trying again in ([\d.]+) s", out)  # fmt: skip
    assert tries == [("1", "0.1"), ("2", "0.2"), ("3", "0.2")], out  # doubling, capped
    assert (root / "faults" / "stockout").read_text() == "0"
    assert out.count("started run ") == 2 and out.count("installing on pod") == 2, out
    assert "finished: " in lines[-1]
    # The second run resumed from a checkpoint of the first one and finished.
    saved = sorted((workdir / "logs").glob("worker0-*.log"))
    assert len(saved) == 2, saved
    # the last copy follows the run's end by about a second
    wait_for(lambda: "=== exited with status 0" in saved[1].read_text(), 30, "the last copy")
    resumed = int(re.search(r"Resuming from .* step (\d+)\.", saved[1].read_text()).group(1))
    assert resumed >= 4 and "step 40/40" in saved[1].read_text()
    assert "step 4/40" in saved[0].read_text() and "Resuming" not in saved[0].read_text()
    assert json.loads((workdir / "results.json").read_text())["step"] == 40
    # Both runs used the compilation cache in the workdir; nothing in the workdir was removed.
    caches = (workdir / "standin_cache_dirs.txt").read_text().split()
    assert caches == [str(workdir / "jax_cache")] * 2
    assert (workdir / "notes.txt").read_text() == "kept\n"
    # The recreated slice is the remembered one; `logs --workdir` reads the saved copies.
    node = json.loads((root / "nodes" / "pod.json").read_text())
    assert node["state"] == "READY" and node["spot"] is True
    assert (root / "queued" / "pod-qr.json").exists() == queued
    copies = launch("logs", *pod, "--workdir", str(workdir), env=env)
    assert copies.returncode == 0 and f"Resuming from {workdir / 'checkpoints'}" in copies.stdout
    assert launch("delete", *pod, env=env).returncode == 0  # no --queued, no --zone needed
    assert not (root / "queued" / "pod-qr.json").exists() and not (root / "nodes" / "pod").exists()
    assert (workdir / "results.json").exists()


def test_supervise_stops_when_the_run_fails_twice_from_the_same_checkpoint(tmp_path):
    _, env, pod = standin_pod(tmp_path, worker_env={"all": {"STANDIN_FAIL_AT": "3"}})
    workdir = tmp_path / "workdir"
    result = launch("supervise", *pod, "--config", "configs/smoke.py", "--workdir", str(workdir),
                    "--allow_local_workdir", "--skip_preflight", "--poll_s", "0.3",
                    "--log_copy_s", "1", *STANDIN_INSTALL, env=env)  # fmt: skip
    line = one_line(result)
    assert "the run failed twice from the same checkpoint (2)" in line
    assert "worker 0 exited with status 1" in line and line.endswith("loss is nan at step 3")
    assert "restart 1/10: worker 0 exited with status 1 (last checkpoint: 2)" in result.stdout
    assert (workdir / "checkpoints" / "2").is_dir()
    # Each run's log copy holds that run alone (the worker's log holds both).
    first, second = sorted((workdir / "logs").glob("worker0-*.log"))
    wait_for(lambda: "=== exited" in second.read_text(), 30, "the second run's last log copy")
    assert first.read_text().count("=== worker 0: start") == 1
    assert second.read_text().count("=== worker 0: start") == 1
    assert first.stem.split("-", 1)[1] not in second.read_text()


def test_supervise_with_a_gs_workdir_copies_logs_and_sees_the_end_through_gsutil(tmp_path):
    # Two workers share gs://bucket/run (tests/fake_gcloud/gsutil: a local directory).
    _, env, pod = standin_pod(tmp_path, "v4-16", worker_env={"all": {"STANDIN_STEP_S": "0.3"}})
    env["FAKE_GCS_ROOT"] = str(tmp_path / "gcs")
    env["FAKE_GCS_CP_DELAY_S"] = "2"  # the workers' uploads are slow: the last one ends late
    # This machine's gsutil is refused (the workers' works): the error is shown, once, and
    # worker 0 judges the end; --delete_when_done then deletes the slice.
    denied = "AccessDeniedException: 401 Anonymous caller does not have storage.objects.get access"
    result = launch("supervise", *pod, "--config", "configs/smoke.py", "--workdir",
                    "gs://bucket/run", "--skip_preflight", "--poll_s", "0.3", "--log_copy_s", "1",
                    "--delete_when_done", *STANDIN_INSTALL, "--config.train_steps=6",
                    env={**env, "FAKE_GCLOUD_GSUTIL_FAIL": denied})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count(f"failed here (exit 1): {denied}; supervise goes on") == 1, out
    assert not re.search(r"restart \d", out) and out.count("started run ") == 1, out
    assert re.search(r"finished: run \S+ wrote gs://bucket/run/results.json", out), out
    assert "deleting pod (--delete_when_done)" in out
    assert not (tmp_path / "gcloud" / "nodes" / "pod.json").exists()
    assert not (tmp_path / "gcloud" / "launcher_state" / "pod.json").exists()
    pod = [*pod, "--zone", "us-central2-b"]  # forgotten with the slice
    run = tmp_path / "gcs" / "bucket" / "run"
    assert json.loads((run / "results.json").read_text())["step"] == 6
    # Each worker's log is copied by `gsutil cp`, the last time after the run's end, and
    # --delete_when_done waited for that copy: the deleted slice's copiers are gone.
    saved = [next((run / "logs").glob(f"worker{w}-*.log")) for w in (0, 1)]
    assert all("=== exited with status 0" in copy.read_text() for copy in saved)
    assert all("step 6/6" in copy.read_text() for copy in saved)
    copies = launch("logs", *pod, "--workdir", "gs://bucket/run", "--worker", "1", env=env)
    assert copies.returncode == 0 and "step 6/6" in copies.stdout  # `gsutil cat` of the copies
    missing = launch("logs", *pod, "--workdir", "gs://bucket/other", env=env)
    assert one_line(missing).endswith(
        "no saved log matches gs://bucket/other/logs/worker0-*.log "
        "(gsutil: CommandException: No URLs matched: gs://bucket/other/logs/worker0-*.log)"
    )


def test_status_names_a_preempted_node_and_fails(tmp_path):
    _, env, pod = standin_pod(tmp_path)
    preempt(env)
    result = launch("status", *pod, env=env)
    assert result.stdout.splitlines()[0] == "node pod: PREEMPTED"
    assert "node pod is PREEMPTED, not READY" in one_line(result)


def test_ssh_failing_once_is_retried_and_logged(tmp_path):
    root, env, pod = standin_pod(tmp_path)
    (root / "faults").mkdir()
    (root / "faults" / "ssh_255").write_text("1")
    result = launch("status", *pod, "--tunnel_through_iap", *QUICK, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\[worker 0\] ssh failed \(exit 255: .*Connection timed out\); retry 1/3",
                     result.stdout)  # fmt: skip
    assert "[worker 0] not running" in result.stdout
    assert (root / "faults" / "ssh_255").read_text() == "0"
    [ssh_line] = [line for line in result.stdout.splitlines() if " ssh pod " in line]
    assert "$ gcloud alpha compute tpus tpu-vm ssh pod" in ssh_line  # IAP: the alpha track
    assert "--tunnel-through-iap" in ssh_line


def run_standin(pod: list[str], workdir: Path, env: dict, *extra: str):
    """`run` of the stand-in training (a long one unless told otherwise)."""
    return launch("run", *pod, "--config", "configs/smoke.py", "--workdir", str(workdir),
                  "--allow_local_workdir", "--skip_preflight", *QUICK, *extra, env=env)  # fmt: skip


def test_a_start_failing_on_worker_1_stops_worker_0(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "setsid").write_text("#!/bin/bash\necho 'setsid: cannot fork' >&2\nexit 1\n")
    (broken / "setsid").chmod(0o755)
    worker1_path = f"{broken}:{tmp_path / 'image'}:{os.environ['PATH']}"
    root, env, pod = standin_pod(
        tmp_path, "v4-16",
        worker_env={"all": {"STANDIN_STEP_S": "0.5"}, "1": {"PATH": worker1_path}},
    )  # fmt: skip
    assert launch("install", *pod, *STANDIN_INSTALL, env=env).returncode == 0
    result = run_standin(pod, tmp_path / "w", env, "--config.train_steps=1000")
    line = one_line(result)
    assert line.startswith("error: worker 1: starting the run failed (exit 5)")
    assert "setsid exited with status 1" in line and line.endswith("; stopped worker(s) [0]")
    log0 = (root / "nodes" / "pod" / "worker0" / "simclr_jax_run.log").read_text()
    # stopped without the stop marker: the trainer's "preempted" status
    assert log0.rstrip().splitlines()[-1].startswith("=== exited with status 42"), log0
    status = launch("status", *pod, env=env)
    assert "[worker 0] not running" in status.stdout and "[worker 1] not running" in status.stdout


def test_run_works_after_the_slice_is_recreated_with_new_host_keys(tmp_path):
    root, env, pod = standin_pod(tmp_path, worker_env={"all": {"STANDIN_STEP_S": "0.5"}})
    assert launch("install", *pod, *STANDIN_INSTALL, env=env).returncode == 0
    assert launch("delete", *pod, env=env).returncode == 0
    created = launch("create", *pod, "--zone", "us-central2-b", "--accelerator", "v4-8", env=env)
    assert created.returncode == 0
    # Plain ssh now refuses the new host key ...
    plain = subprocess.run(
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=0", "--quiet",
         "--zone=us-central2-b", "--command=true"], env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert plain.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in plain.stderr
    # ... the launcher's does not check it.
    assert launch("install", *pod, *STANDIN_INSTALL, env=env).returncode == 0
    started = run_standin(pod, tmp_path / "w", env, "--config.train_steps=1000")
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for(lambda: (tmp_path / "w" / "checkpoints" / "2").is_dir(), 60, "checkpoint 2")
    status = launch("status", *pod, env=env)
    assert status.stdout.splitlines()[0] == "node pod: READY, v4-8, 1 worker(s)"
    assert "[worker 0] running (pid" in status.stdout
    assert re.search(r"\[worker 0\] last progress: .*step \d+/1000 .*ETA ", status.stdout)
    # Ctrl-C while following the log: one line, no traceback; the run goes on.
    follow = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "logs", *pod], env={STATE_DIR_ENV: str(STATE_DIR), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(3)
    follow.send_signal(signal.SIGINT)
    _, err = follow.communicate(timeout=30)
    assert follow.returncode == 130 and err.splitlines() == [
        "interrupted: logs stopped here (a started run goes on; `status` shows it)"
    ]
    stopped = launch("stop", *pod, env=env)
    assert "[worker 0] stopped: === exited with status 0" in stopped.stdout, stopped.stdout
    # The worker's log was copied into the workdir, the last time after the run's end.
    [copy] = (tmp_path / "w" / "logs").glob("worker0-*.log")
    wait_for(lambda: "=== exited with status 0" in copy.read_text(), 30, "the final log copy")
    assert "Stopped on request: saved step" in copy.read_text()  # `stop` set the marker
    assert (tmp_path / "w" / "stop_requested").read_text() == "stop\n"  # written before SIGTERM


def test_the_pid_check_ignores_another_process_with_the_recorded_pid(tmp_path):
    """After a reboot the recorded pid may belong to anything: only our run's token counts."""
    home = tmp_path / "home"
    home.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (home / "simclr_jax_run.pid").write_text(f"{other.pid}\n")
        (home / "simclr_jax_run.id").write_text("20250101T000000Z-abcdef12\n")
        env = {**os.environ, "HOME": str(home)}
        out = subprocess.run(["bash", "-c", tpu.status_remote(1)], env=env, capture_output=True,
                             text=True).stdout  # fmt: skip
        assert out.splitlines()[0].startswith("not running; last run")
    finally:
        other.kill()


def test_bad_input_is_one_line_and_removes_nothing(tmp_path):
    _, env, _ = standin_pod(tmp_path, "v4-16")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("kept\n")
    unknown = one_line(launch("status", "--name", "nosuch", env=env))
    assert "unknown --name 'nosuch': no state file" in unknown and "--zone" in unknown
    absent = one_line(launch("status", "--name", "nosuch", "--zone", "us-central2-b", env=env))
    assert "'nosuch' does not exist in us-central2-b (NOT_FOUND)" in absent
    supervise = ["supervise", "--name", "pod", "--config", "configs/smoke.py",
                 "--workdir", str(workdir)]  # fmt: skip
    local = one_line(launch(*supervise, env=env))
    assert "a host-local workdir goes with its disk" in local
    relative = supervise[:-1] + ["run_rel"]
    assert "a relative workdir lands in the workers' ~/simclr_jax" in one_line(
        launch(*relative, "--allow_local_workdir", env=env)
    )
    negative = one_line(launch(*supervise, "--max_restarts", "-1", env=env))
    assert "--max_restarts=-1: must be >= 0" in negative
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ exit statuses, one run


def test_the_launchers_repeat_the_trainers_exit_statuses_and_stop_marker():
    """The launchers cannot import jax, so launch/common.py repeats these for both of them;
    they must not drift apart from the trainer's."""
    from simclr_jax import preemption

    assert Path(common.__file__) == REPO / "launch" / "common.py"
    assert common.EXIT_FINISHED == preemption.EXIT_FINISHED == 0
    assert common.EXIT_CONFIG_ERROR == preemption.EXIT_CONFIG_ERROR
    assert common.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED
    assert common.STOP_MARKER == preemption.STOP_MARKER


def test_supervise_judges_the_end_on_worker_0_and_a_leftover_results_json_starts_nothing_early(
    tmp_path,
):
    """A local workdir on a shared file system: supervise never looks for results.json here,
    so a finished run is exit 0 without a restart; then a new config (more steps) in the same
    workdir, with the first run's results.json left there, is started, resumes and finishes."""
    _, env, pod = standin_pod(tmp_path, worker_env={"all": {"STANDIN_STEP_S": "0.1"}})
    workdir = tmp_path / "shared" / "run"
    supervise = ["supervise", *pod, "--config", "configs/smoke.py", "--workdir", str(workdir),
                 "--allow_local_workdir", "--skip_preflight", "--poll_s", "0.3",
                 "--max_restarts", "1", *STANDIN_INSTALL]  # fmt: skip
    first = launch(*supervise, "--config.train_steps=6", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert not re.search(r"restart \d", first.stdout), first.stdout
    assert re.search(rf"finished: run \S+ wrote {re.escape(str(workdir))}/results.json$",
                     first.stdout.splitlines()[-1])  # fmt: skip
    assert json.loads((workdir / "results.json").read_text())["step"] == 6

    second = launch(*supervise, "--config.train_steps=10", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "starting the run of" in second.stdout and second.stdout.count("started run ") == 1
    assert json.loads((workdir / "results.json").read_text())["step"] == 10
    log = (tmp_path / "gcloud" / "nodes" / "pod" / "worker0" / "simclr_jax_run.log").read_text()
    assert f"Resuming from {workdir / 'checkpoints'} step 6." in log
    assert "(results.json: this)" in log.rstrip().splitlines()[-1]


def test_two_concurrent_runs_start_one_and_supervise_stops_at_a_config_error(tmp_path):
    root, env, pod = standin_pod(tmp_path, "v4-16", worker_env={"all": {"STANDIN_STEP_S": "0.5"}})
    assert launch("install", *pod, *STANDIN_INSTALL, env=env).returncode == 0
    workdir = tmp_path / "w"
    command = [sys.executable, str(LAUNCHER), "run", *pod, "--config", "configs/smoke.py",
               "--workdir", str(workdir), "--allow_local_workdir", "--skip_preflight", *QUICK,
               "--config.train_steps=1000"]  # fmt: skip
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]  # fmt: skip
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    [(_, _, refused)] = [r for r in results if r[0] == 1]
    [line] = refused.splitlines()
    assert line.startswith("error: worker 0: claiming the slice failed (exit 6)"), line
    assert re.search(r"refused: (another start \(run \S+\) is under way|run \S+ is going)", line)
    # One run id on both workers, one live run each.
    homes = [root / "nodes" / "pod" / f"worker{w}" for w in (0, 1)]
    ids = {(home / "simclr_jax_run.id").read_text() for home in homes}
    assert len(ids) == 1
    for home in homes:
        assert (home / "simclr_jax_run.log").read_text().count("start at") == 1
    stopped = launch("stop", *pod, env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "[worker 0] stop marker written: " in stopped.stdout
    for w in (0, 1):
        assert f"[worker {w}] stopped: === exited with status 0" in stopped.stdout
    status = launch("status", *pod, env=env)
    assert "[worker 1] not running; last run" in status.stdout
    assert "exit status: 0 (finished, or stopped on purpose)" in status.stdout

    # A configuration error (exit 2) ends supervision with its line: no restart.
    result = launch("supervise", *pod, "--config", "configs/smoke.py", "--workdir",
                    str(workdir), "--allow_local_workdir", "--skip_preflight", "--poll_s", "0.3",
                    *STANDIN_INSTALL, "--config.train_steps=ten", env=env)  # fmt: skip
    line = one_line(result)
    assert "exited with status 2 (configuration error), which a restart cannot fix" in line
    assert line.endswith("error: --config.train_steps=ten: not a number"), line
    assert not re.search(r"restart \d", result.stdout), result.stdout


def test_misspelled_launcher_flags_are_refused_not_sent_to_training(tmp_path):
    run = ["run", *POD, "--config", "configs/smoke.py", "--workdir", "gs://b/w"]
    line = one_line(launch(*run, "--poll-s", "5", "--envv", "A=1", "--config.x=1", "--dry_run"))
    assert "run: unrecognized arguments: --poll-s 5 --envv A=1 " in line
    assert "training takes only --config.FIELD=VALUE" in line
    # argparse's prefix matching is off: --work is not --workdir
    assert "unrecognized arguments: --work" in one_line(
        launch(*run, "--work", "gs://b/x", "--dry_run")
    )
    [*_, start] = dry_run("run", *POD, "--config", "configs/smoke.py", "--workdir", "gs://b/w",
                          "--config.a", "3", "--config.b=4")  # fmt: skip
    assert "--process_id" not in remote_command(start)  # one worker
    assert "--config.a 3 --config.b=4" in remote_command(start)
    # create takes overrides for its gate, and only with --config
    assert "overrides --config, which is not given" in one_line(
        launch("create", *POD, "--accelerator", "v4-8", "--config.x=1", "--dry_run")
    )


def test_iap_goes_through_gcloud_alpha_and_excludes_internal_ip(tmp_path):
    commands = dry_run("install", *POD, "--tunnel_through_iap")
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert gcloud and all(c[:6] == ["gcloud", "alpha", "compute", "tpus", "tpu-vm", c[5]]
                          and c[5] in ("scp", "ssh") for c in gcloud)  # fmt: skip
    plain = [c for c in dry_run("install", *POD, "--internal_ip") if c[0] == "gcloud"]
    assert all(c[1] == "compute" and "--internal-ip" in c for c in plain)
    both = one_line(launch("status", *POD, "--internal_ip", "--tunnel_through_iap", "--dry_run"))
    assert "--internal_ip and --tunnel_through_iap exclude each other" in both
    # The fake, like the real gcloud, refuses IAP on the GA track and both flags together.
    env = fake_env(tmp_path)
    ssh = ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z", "--quiet", "--command=true"]
    for argv, said in (
        ([*ssh, "--tunnel-through-iap"], "unrecognized arguments: --tunnel-through-iap"),
        (["alpha", *ssh, "--tunnel-through-iap", "--internal-ip"], "At most one of"),
    ):
        result = subprocess.run([str(FAKE_GCLOUD / "gcloud"), *argv], env=env,
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 2 and said in result.stderr, result.stderr


@pytest.mark.parametrize(
    "content,said",
    [
        ("[1, 2]", "holds a list, not the object `create` writes"),
        ('"us-central2-b"', "holds a str, not the object `create` writes"),
        ('{"zone": "z", "queued": "false"}', "'queued' is 'false', not a bool"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_corrupt_state_file_is_one_line_naming_it(tmp_path, content, said):
    env = fake_env(tmp_path)
    state = tmp_path / "launcher_state" / "pod.json"
    state.parent.mkdir()
    state.write_text(content)
    line = one_line(launch("status", "--name", "pod", env=env))
    assert f"state file {state}: {said}" in line and "move it away" in line
    assert state.read_text() == content  # nothing deleted


def test_create_checks_the_accelerator_and_waits_for_capacity_only_when_asked(tmp_path):
    v5e = one_line(launch("create", *POD, "--accelerator", "v5e-16", "--dry_run"))
    assert "use --accelerator v5litepod-16" in v5e
    odd = one_line(launch("create", *POD, "--accelerator", "v4-33", "--dry_run"))
    assert "no such v4 slice" in odd and "a multiple of 8" in odd
    assert dry_run("create", *POD, "--accelerator", "v5litepod-4")  # a valid small slice
    env = fake_env(tmp_path)
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "stockout").write_text("2")
    refused = one_line(launch("create", *POD, "--accelerator", "v4-8", env=env))
    assert (
        "no capacity for v4-8 in us-central2-b: ERROR: (gcloud.fake) RESOURCE_EXHAUSTED" in refused
    )
    assert refused.endswith("; `supervise` waits for capacity (--capacity_wait_h)")
    waited = launch("create", *POD, "--accelerator", "v4-8", "--capacity_wait_h", "1",
                    "--capacity_retry_s", "0.05", env=env)  # fmt: skip
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "(try 1: ERROR: (gcloud.fake) RESOURCE_EXHAUSTED" in waited.stdout
    assert "Created TPU VM simclr-v4" in waited.stdout


def test_delete_of_a_slice_already_gone_forgets_it(tmp_path):
    env = fake_env(tmp_path)
    assert launch("create", *POD, "--accelerator", "v4-8", env=env).returncode == 0
    gone = ["compute", "tpus", "tpu-vm", "delete", "simclr-v4", "--zone=us-central2-b", "--quiet"]
    subprocess.run([str(FAKE_GCLOUD / "gcloud"), *gone], env=env, check=True)
    deleted = launch("delete", "--name", "simclr-v4", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert "simclr-v4 was already gone" in deleted.stdout
    assert not (tmp_path / "launcher_state" / "simclr-v4.json").exists()
    supervise = ["supervise", "--name", "gone", "--zone", "us-central2-b", "--workdir", "gs://b/w"]
    absent = one_line(launch(*supervise, "--config", "configs/smoke.py", env=env))
    assert "supervise does not know how to make it" in absent and "recreates" not in absent


def test_a_config_file_the_workers_do_not_get_is_refused(tmp_path):
    env = fake_env(tmp_path)
    line = one_line(launch("run", *POD, "--config", "configs/not_committed_here.py:x",
                           "--workdir", "gs://b/w", env=env))  # fmt: skip
    assert "configs/not_committed_here.py is not committed" in line and "`install`" in line
    outside = one_line(launch("run", *POD, "--config", "/etc/hosts", "--workdir", "gs://b/w",
                              env=env))  # fmt: skip
    assert "is outside the checkout" in outside


def fake_project_venv(path: Path, record: Path) -> Path:
    """A 'virtual environment' whose python has JAX and libtpu (it says so) and whose preflight
    refuses the run, recording its arguments."""
    python = path / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = -c ]; then exit 0; fi\n'
        f'printf "%s\\n" "$@" > {shlex.quote(str(record))}\n'
        "echo 'preflight: does not fit: needs 40.0 GiB per chip, over the 32.0 GiB HBM' >&2\n"
        "exit 1\n"
    )
    python.chmod(0o755)
    return path


def test_the_gate_uses_the_projects_python_when_the_launchers_has_no_jax(tmp_path):
    """`python3 launch/tpu.py` with a system Python (here: no site-packages, so no JAX) uses
    $SIMCLR_JAX_VENV for the preflight, says so, and passes it the overrides."""
    record = tmp_path / "argv.txt"
    venv = fake_project_venv(tmp_path / "venv", record)
    create = ["create", *POD, "--accelerator", "v4-8", "--config", "configs/smoke.py:pretrain",
              "--config.train_batch_size=4096", "--dry_run"]  # fmt: skip
    env = {**os.environ, STATE_DIR_ENV: str(tmp_path / "state")}
    bare = [sys.executable, "-S", str(LAUNCHER)]
    result = subprocess.run([*bare, *create], env={**env, "SIMCLR_JAX_VENV": str(venv)},
                            capture_output=True, text=True)  # fmt: skip
    line = one_line(result)
    assert "does not fit: needs 40.0 GiB per chip" in line and "refused before launching" in line
    assert f"has no JAX; using the project's {venv / 'bin' / 'python'} (from $SIMCLR_JAX_VENV)" in (
        result.stdout
    )
    assert record.read_text().split() == [
        "-m", "simclr_jax.preflight", "--config=configs/smoke.py:pretrain", "--tpu=v4-8",
        "--config.train_batch_size=4096",
    ]  # fmt: skip
    env.pop("SIMCLR_JAX_VENV", None)
    skipped = subprocess.run([*bare, *create], env=env, capture_output=True, text=True)
    assert skipped.returncode == 0, skipped.stderr
    assert (
        "preflight skipped: this Python" in skipped.stderr and "SIMCLR_JAX_VENV" in skipped.stderr
    )


def test_ctrl_c_while_run_is_starting_stops_what_it_started(tmp_path):
    """A start slowed by 3 s (setsid, as on a loaded host) is interrupted once worker 0 has
    begun it: the launcher waits for it to detach, stops it on every worker, gives the slice
    back and ends with one line; nothing is left running."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "setsid").write_text(f'#!/bin/bash\nsleep 3\nexec {shutil.which("setsid")} "$@"\n')
    (slow / "setsid").chmod(0o755)
    path = f"{slow}:{tmp_path / 'image'}:{os.environ['PATH']}"
    root, env, pod = standin_pod(tmp_path, "v4-16", worker_env={"all": {"PATH": path}})
    assert launch("install", *pod, *STANDIN_INSTALL, env=env).returncode == 0
    homes = [root / "nodes" / "pod" / f"worker{w}" for w in (0, 1)]
    command = [sys.executable, str(LAUNCHER), "run", *pod, "--config", "configs/smoke.py",
               "--workdir", str(tmp_path / "w"), "--allow_local_workdir", "--skip_preflight",
               *QUICK, "--config.train_steps=1000"]  # fmt: skip
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    log0 = homes[0] / "simclr_jax_run.log"
    deadline = time.monotonic() + 60
    while not (log0.exists() and "start at" in log0.read_text()):
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "interrupted while starting run " in err, err
    assert err.splitlines()[-1].startswith("interrupted: run stopped here"), err
    time.sleep(1)
    status = launch("status", *pod, env=env)
    assert "[worker 0] not running" in status.stdout and "[worker 1] not running" in status.stdout
    assert not (homes[0] / "simclr_jax_run.claim").exists()  # the slice is free again
    again = run_standin(pod, tmp_path / "w", env, "--config.train_steps=2")
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_stop_marker_goes_to_a_gs_workdir_through_the_workers_gsutil(tmp_path):
    """`stop` writes <workdir>/stop_requested from worker 0 before any SIGTERM; a gs:// workdir
    through the worker's gsutil, whose failure is an error that names it."""
    home = tmp_path / "home"
    (home / "simclr_jax").mkdir(parents=True)
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                            "SIMCLR_JAX_RUN_ID=r1"])  # fmt: skip
    try:
        (home / "simclr_jax_run.pid").write_text(f"{run.pid}\n")
        (home / "simclr_jax_run.id").write_text("r1\n")
        (home / "simclr_jax_run.workdir").write_text("gs://bucket/run\n")
        env = {**os.environ, "HOME": str(home), "PATH": f"{FAKE_GCLOUD}:{os.environ['PATH']}",
               "FAKE_GCS_ROOT": str(tmp_path / "gcs")}  # fmt: skip
        wrote = subprocess.run(["bash", "-c", tpu.marker_remote()], env=env, capture_output=True,
                               text=True)  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        assert wrote.stdout.strip() == "stop marker written: gs://bucket/run/stop_requested"
        assert (tmp_path / "gcs" / "bucket" / "run" / "stop_requested").read_text() == "stop\n"
        denied = {**env, "FAKE_GCLOUD_GSUTIL_FAIL": "AccessDeniedException: 403 no write"}
        failed = subprocess.run(["bash", "-c", tpu.marker_remote()], env=denied,
                                capture_output=True, text=True)  # fmt: skip
        assert failed.returncode == 7 and failed.stderr.strip() == (
            "could not write the stop marker gs://bucket/run/stop_requested: "
            "AccessDeniedException: 403 no write"
        )
        assert run.poll() is None  # writing the marker signals nothing
    finally:
        run.kill()
