#!/usr/bin/env python3
"""Runs a simulated N-host pod on one machine: N processes of `simclr_jax.main`, each with K
simulated CPU devices, talking through a loopback coordinator (gloo collectives). Stdlib only.

  python3 launch/simulate_pod.py --num_processes 2 --devices_per_process 4 \
      --config configs/smoke.py:pretrain --workdir /tmp/pod -- --config.train_steps=20
  python3 launch/simulate_pod.py ... --dry_run      # print the exact commands, run nothing

Arguments after `--` go to every process (config overrides). Each process logs to
<log_dir>/process<i>.log; if one fails, the others are stopped (no pod left hanging). SIGTERM to
this script is passed to every process: they agree on a step, checkpoint and exit 0, as on a
preempted pod; running the same command again resumes.

Each process is `simclr_jax.main` started through this script's --worker mode, which first
raises the buffers of its loopback TCP sockets (--socket_buffer_bytes, 0 = kernel default):
gloo's cross-process collectives otherwise move the gradient all-reduce one 64 KiB loopback
segment per delayed ACK, ~40x slower per step (benchmarks/README.md). A simulation matter
only: TPU pods talk over ICI/DCN, not these sockets.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that is free right now, for the coordinator."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_commands(args: argparse.Namespace, extra: list[str]) -> list[tuple[dict, list[str]]]:
    """(environment additions, argv) of every process."""
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}"}
    commands = []
    for pid in range(args.num_processes):
        argv = [
            args.python, str(Path(__file__).resolve()), "--worker",
            f"--socket_buffer_bytes={args.socket_buffer_bytes}", "--",
            f"--config={args.config}", f"--workdir={args.workdir}",
            f"--coordinator_address=127.0.0.1:{args.port}",
            f"--num_processes={args.num_processes}", f"--process_id={pid}",
            f"--distributed_timeout_s={args.timeout_s}", *extra,
        ]  # fmt: skip
        commands.append((env, argv))
    return commands


def render(env: dict, argv: list[str]) -> str:
    """One shell line: environment assignments, then the quoted command."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def run(commands: list[tuple[dict, list[str]]], log_dir: Path) -> int:
    """Starts every process, forwards SIGTERM/SIGINT, stops all if one fails; worst exit code."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid, (env, argv) in enumerate(commands):
        log = open(log_dir / f"process{pid}.log", "w")
        print(f"process {pid}: {render(env, argv)} > {log.name}", flush=True)
        procs.append(
            subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=log)
        )

    def forward(signum, _frame):
        for proc in procs:
            proc.send_signal(signum)

    # Ctrl-C already reaches every process (same process group); SIGTERM from a scheduler
    # only reaches this script.
    signal.signal(signal.SIGTERM, forward)
    while any(proc.poll() is None for proc in procs):
        if any(proc.returncode not in (None, 0) for proc in procs):
            # One host died: the rest would block in a collective until JAX's heartbeat
            # timeout; stop them now.
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.5)
    codes = [proc.returncode for proc in procs]
    print(f"exit codes: {codes}", flush=True)
    return next((code for code in codes if code != 0), 0)


def worker(main_flags: list[str], socket_buffer_bytes: int) -> None:
    """One simulated host: tunes its loopback sockets in the background, runs simclr_jax.main."""
    sys.path.insert(0, str(REPO))
    from absl import app

    from launch import loopback
    from simclr_jax import main as cli

    if socket_buffer_bytes > 0:
        loopback.start_loopback_socket_tuner(socket_buffer_bytes)
    sys.argv = ["simclr_jax.main", *main_flags]
    app.run(cli.main)


def main(argv: list[str] | None = None) -> int:
    """Parses arguments; prints (dry run) or runs the pod."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to every process."
    )
    parser.add_argument("--num_processes", type=int, default=2, help="simulated hosts")
    parser.add_argument("--devices_per_process", type=int, default=4, help="CPU devices each")
    parser.add_argument("--config", required=True, help="e.g. configs/smoke.py:pretrain")
    parser.add_argument("--workdir", required=True, help="shared by all processes")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout_s", type=int, default=120, help="start-up timeout")
    parser.add_argument("--log_dir", default=None, help="default: <workdir>/logs")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--socket_buffer_bytes", type=int, default=4 << 20,
        help="SO_SNDBUF/SO_RCVBUF of each process's loopback sockets (0: kernel default)",
    )  # fmt: skip
    if own[:1] == ["--worker"]:  # one process of the pod (the command lines this script prints)
        only = argparse.ArgumentParser(prog="simulate_pod.py --worker")
        only.add_argument("--socket_buffer_bytes", type=int, default=0)
        worker(extra, only.parse_args(own[1:]).socket_buffer_bytes)
        return 0
    args = parser.parse_args(own)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    if args.socket_buffer_bytes < 0:
        parser.error("--socket_buffer_bytes must be >= 0 (0 keeps the kernel default)")
    args.port = args.port or free_port()
    commands = process_commands(args, extra)
    if args.dry_run:
        for env, command in commands:
            print(render(env, command))
        return 0
    return run(commands, Path(args.log_dir or Path(args.workdir) / "logs"))


if __name__ == "__main__":
    sys.exit(main())
