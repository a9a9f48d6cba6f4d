"""Every gcloud command launch/tpu.py can emit, parsed by the real Google Cloud CLI, offline.

gcloud parses its arguments before it asks for an account: with an empty configuration
(CLOUDSDK_CONFIG in a temporary directory, a project set, no metadata server) and no network
(`unshare -n`), a command that parses stops at "You do not currently have an active account
selected" (exit 1); one that does not stops at its parser (exit 2, "unrecognized arguments",
"argument ...", "Invalid choice"). The fake gcloud (tests/fake_gcloud) checks behaviour; this
checks that the real one accepts the words. Each shape of command line is run once (the ssh
commands differ in their --command= text, which gcloud passes on as one argument)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "tpu.py"
GCLOUD = shutil.which("gcloud")
POD = ["--name", "pod", "--zone", "us-central2-b", "--project", "my-proj", "--num_workers", "2"]
NO_ACCOUNT = "You do not currently have an active account selected"
PARSER_ERRORS = re.compile(r"unrecognized arguments|argument --|Invalid choice|Usage: gcloud")
SLOWEST_S = 30  # one gcloud start is 1-2 s; far more means it waited for something

pytestmark = pytest.mark.skipif(GCLOUD is None, reason="no gcloud on PATH")

# (subcommand, flags): every path of the launcher that reaches gcloud.
LAUNCHES = [
    ("create", ["--accelerator", "v4-32"]),
    ("create", ["--accelerator", "v4-32", "--spot"]),
    ("create", ["--accelerator", "v5litepod-16", "--queued"]),
    ("create", ["--accelerator", "v5litepod-16", "--queued", "--spot", "--runtime_version", "x"]),
    ("install", []),
    ("install", ["--internal_ip"]),
    ("install", ["--tunnel_through_iap"]),
    (
        "run",
        [
            "--config",
            "configs/smoke.py:pretrain",
            "--workdir",
            "gs://b/w",
            "--env",
            "A=1 2",
            "--config.train_steps=3",
        ],
    ),  # fmt: skip
    ("run", ["--config", "configs/smoke.py", "--workdir", "gs://b/w", "--tunnel_through_iap"]),
    ("status", []),
    ("status", ["--queued", "--internal_ip"]),
    ("stop", []),
    ("stop", ["--tunnel_through_iap"]),
    ("logs", []),
    ("logs", ["--no_follow", "--worker", "1", "--internal_ip"]),
    ("delete", []),
    ("delete", ["--queued"]),
]


def load_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tpu_launcher_real", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emitted(state_dir: Path) -> list[list[str]]:
    """The gcloud command lines of every launch path: the dry runs' printed commands, and the
    ones only `supervise` and `status` run (describe, the queued resource's state, the probe,
    giving a claim back), built by the launcher's own functions."""
    env = {**os.environ, "SIMCLR_TPU_STATE_DIR": str(state_dir)}
    commands = []
    for sub, flags in LAUNCHES:
        result = subprocess.run([sys.executable, str(LAUNCHER), sub, *POD, *flags, "--dry_run"],
                                capture_output=True, text=True, env=env)  # fmt: skip
        assert result.returncode == 0, f"{sub} {flags}: {result.stderr}"
        for line in result.stdout.splitlines():
            line = re.sub(r"^(\[worker \d+\] )?\$ ", "", line)
            if line.startswith("gcloud "):
                commands.append(shlex.split(line))
    tpu = load_launcher()
    for queued in (False, True):
        for iap in (False, True):
            args = tpu.parse_args(["status", "--name", "pod", "--zone", "us-central2-b",
                                   *(["--queued"] if queued else []),
                                   *(["--tunnel_through_iap"] if iap else [])])  # fmt: skip
            commands += [tpu.describe_command(args), tpu.queued_state_command(args),
                         tpu.ssh(args, tpu.probe_remote(0), worker=0),
                         tpu.ssh(args, tpu.release_remote("r1"), worker=0),
                         *tpu.delete_commands(args)]  # fmt: skip
    # Commands that differ only in the text of --command= (one argument gcloud hands to ssh) or
    # in the --worker= number parse alike: one of each shape is run, the longest.
    shapes: dict[tuple[str, ...], list[str]] = {}
    for command in commands:
        shape = tuple(re.sub(r"^(--command=|--worker=\d).*", r"\1", a) for a in command)
        if shape not in shapes or len(shlex.join(command)) > len(shlex.join(shapes[shape])):
            shapes[shape] = command
    return list(shapes.values())


def kind(command: list[str]) -> str:
    """'compute tpus tpu-vm ssh' of a gcloud command line: its groups up to the verb."""
    for i, word in enumerate(command[1:], 1):
        if word in ("create", "describe", "delete", "ssh", "scp"):
            return " ".join(command[1 : i + 1])
    raise AssertionError(f"no verb in {command}")


def test_every_gcloud_command_the_launcher_emits_parses_under_the_real_gcloud(tmp_path):
    config = Path(tempfile.mkdtemp(prefix="gcloud_config_", dir=tmp_path))
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
    }
    env.pop("CLOUDSDK_CORE_ACCOUNT", None)
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    subprocess.run([GCLOUD, "config", "set", "project", "my-proj"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    offline = subprocess.run([*unshare, "true"], capture_output=True, text=True)
    assert offline.returncode == 0, f"`{shlex.join(unshare)} true` failed: {offline.stderr}"

    commands = emitted(tmp_path / "state")
    # every kind the issue lists is among them
    kinds = {kind(c) for c in commands}
    assert kinds == {"compute tpus tpu-vm create", "compute tpus tpu-vm describe",
                     "compute tpus tpu-vm delete", "compute tpus tpu-vm ssh",
                     "compute tpus tpu-vm scp", "alpha compute tpus tpu-vm ssh",
                     "alpha compute tpus tpu-vm scp", "compute tpus queued-resources create",
                     "compute tpus queued-resources describe",
                     "compute tpus queued-resources delete"}, kinds  # fmt: skip
    assert any("--spot" in c for c in commands) and any("--internal-ip" in c for c in commands)
    source = tmp_path / "simclr_jax_src.tar.gz"  # scp's local file exists, as in `install`
    source.write_bytes(b"")
    commands = [
        [source.as_posix() if a.endswith("/simclr_jax_src.tar.gz") else a for a in c]
        for c in commands
    ]

    def one(command: list[str]) -> tuple[list[str], subprocess.CompletedProcess, float]:
        start = time.monotonic()
        result = subprocess.run([*unshare, GCLOUD, *command[1:]], env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        return command, result, time.monotonic() - start

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(one, commands))
    total = time.monotonic() - began
    slowest = max(seconds for _, _, seconds in outcomes)
    print(f"{len(outcomes)} gcloud commands in {total:.1f} s (slowest {slowest:.1f} s)")
    for command, result, seconds in outcomes:
        said = result.stderr.strip()
        assert not PARSER_ERRORS.search(said), f"gcloud's parser refused:\n{said}\n{command}"
        assert result.returncode == 1 and NO_ACCOUNT in said, (
            f"exit {result.returncode}, not the missing account:\n{said}\n{shlex.join(command)}"
        )
        assert seconds < SLOWEST_S, f"{seconds:.1f} s: {shlex.join(command)}"
    assert total < 150, f"{len(outcomes)} commands took {total:.0f} s"
