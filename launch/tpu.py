#!/usr/bin/env python3
"""Cloud TPU VM pod launcher (stdlib only): create, install, run, status, stop, logs, delete.

  python3 launch/tpu.py create  --name simclr --zone us-central2-b --accelerator v4-32 --spot
  python3 launch/tpu.py install --name simclr --zone us-central2-b
  python3 launch/tpu.py run     --name simclr --zone us-central2-b \
      --config configs/imagenet_pretrain.py:r50_1x --workdir gs://BUCKET/simclr/r50 \
      --env TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets
  python3 launch/tpu.py status  --name simclr --zone us-central2-b
  python3 launch/tpu.py stop    --name simclr --zone us-central2-b    # SIGTERM: save, exit 0
  python3 launch/tpu.py logs    --name simclr --zone us-central2-b    # follows process 0
  python3 launch/tpu.py delete  --name simclr --zone us-central2-b

Every subcommand prints the exact commands it runs; --dry_run prints them only. On the workers:
~/simclr_jax (this commit's source), ~/simclr_jax_venv (Python >= 3.11 with
requirements/lock.txt + tpu.txt), ~/simclr_jax_run.log (one log per worker, appended by each
run), ~/simclr_jax_run.pid.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import preflight_gate  # noqa: E402 - next to this script, which is not a package

# Software versions per TPU generation (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Remote paths, double-quoted so that $HOME expands on the worker (and could hold spaces).
SRC = '"$HOME/simclr_jax"'
VENV = '"$HOME/simclr_jax_venv"'
PYTHON = '"$HOME/simclr_jax_venv/bin/python"'
MARKER = '"$HOME/simclr_jax_venv/simclr_jax_installed"'
LOG = '"$HOME/simclr_jax_run.log"'
PID = '"$HOME/simclr_jax_run.pid"'
WORKDIR_FILE = '"$HOME/simclr_jax_run.workdir"'
ARCHIVE_NAME = "simclr_jax_src.tar.gz"
LOCK_NAME = "simclr_jax_lock.txt"
COORDINATOR_PORT = 8476  # JAX's default coordinator port on Cloud TPU
QUEUED_POLL_S = 30
DETACH_WAIT_S = 60  # for the started run to leave the ssh session


class LaunchError(Exception):
    """A failure reported as one line: what failed, where, and the command."""


# ------------------------------------------------------------------ gcloud command lines


def runtime_version(accelerator: str) -> str:
    """Default TPU VM software version for an accelerator type such as v4-32."""
    generation = accelerator.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise LaunchError(
            f"--accelerator={accelerator!r}: unknown TPU generation {generation!r}, so no known "
            f"runtime version; use one of {', '.join(sorted(RUNTIME_VERSIONS))} (e.g. v4-32) "
            "or pass --runtime_version."
        )
    return RUNTIME_VERSIONS[generation]


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _tpu_vm(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, *_location(args)]


def ssh(args: argparse.Namespace, command: str, worker: int | str = "all") -> list[str]:
    """gcloud ssh running one shell command on one worker (or all of them)."""
    return _tpu_vm(args, "ssh", args.name, f"--worker={worker}", f"--command={command}")


def describe_command(args: argparse.Namespace) -> list[str]:
    """The node's description as JSON (its workers are its networkEndpoints)."""
    return _tpu_vm(args, "describe", args.name, "--format=json")


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    """A pod slice: on-demand, spot, or a queued resource (optionally spot)."""
    version = args.runtime_version or runtime_version(args.accelerator)
    spot = ["--spot"] if args.spot else []
    if args.queued:
        return [[
            "gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr",
            f"--node-id={args.name}", *_location(args), f"--accelerator-type={args.accelerator}",
            f"--runtime-version={version}", *spot,
        ]]  # fmt: skip
    return [_tpu_vm(args, "create", args.name, f"--accelerator-type={args.accelerator}",
                    f"--version={version}", *spot)]  # fmt: skip


def queued_state_command(args: argparse.Namespace) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, ..., ACTIVE)."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{args.name}-qr",
            *_location(args), "--format=value(state.state)"]  # fmt: skip


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    """Deletes the slice (and its queued resource, if it was made as one)."""
    if args.queued:
        return [[
            "gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr",
            *_location(args), "--force", "--quiet",
        ]]  # fmt: skip
    return [_tpu_vm(args, "delete", args.name, "--quiet")]


# ------------------------------------------------------------------ remote shell strings


def _running_test() -> str:
    # True when this worker's run (the process group started by `run`) is alive.
    return f'[ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null'


def install_remote(args: argparse.Namespace, commit: str) -> str:
    """Unpacks the source and builds the venv; the marker is written only on success."""
    extra = "-" if args.cpu_only else f"{SRC}/requirements/tpu.txt"
    pip_args = shlex.split(args.pip_args)
    setup = (
        f"bash {SRC}/launch/worker_setup.sh {SRC} {VENV} {shlex.quote(args.python_version)} "
        f'"$HOME/{LOCK_NAME}" {extra} -- {shlex.join(pip_args)}'
    ).rstrip()
    return (
        f"if {_running_test()}; then echo 'a run is going on this worker; stop it first' >&2; "
        f"exit 3; fi; rm -f {MARKER} && rm -rf {SRC} && mkdir -p {SRC} && "
        f'tar xzf "$HOME/{ARCHIVE_NAME}" -C {SRC} && {setup} && '
        f"echo {shlex.quote(commit)} > {MARKER}"
    )


def preflight_remote() -> str:
    """Fails unless install finished on this worker and no run is going."""
    return (
        f"[ -f {MARKER} ] || {{ echo 'simclr_jax is not installed here (run install)' >&2; "
        f'exit 3; }}; if {_running_test()}; then echo "a run is already going '
        f'(pid $(cat {PID})); stop it first" >&2; exit 3; fi; echo "ready: $(cat {MARKER})"'
    )


def train_argv(args: argparse.Namespace, worker: int, num_workers: int, coordinator: str) -> str:
    """The quoted training command line of one worker (explicit multi-host set-up)."""
    argv = [
        "-m", "simclr_jax.main", f"--config={args.config}", f"--workdir={args.workdir}",
    ]  # fmt: skip
    if num_workers > 1:
        argv += [
            f"--coordinator_address={coordinator}",
            f"--num_processes={num_workers}",
            f"--process_id={worker}",
        ]
    argv += args.override
    env = ["env", *args.env] if args.env else []
    return " ".join([*map(shlex.quote, env), PYTHON, shlex.join(argv)])


def run_inner(args: argparse.Namespace, worker: int, num_workers: int, coordinator: str) -> str:
    """The detached shell: trains, then logs the exit status."""
    # It records its own pid (the process group's id, thanks to setsid, even where setsid had
    # to fork), which tells run_remote that it is detached, and traps TERM (a trap, not an
    # ignore, so Python keeps its own handler) to outlive `stop`'s signal to the group and still
    # write the exit status to the log.
    return (
        f"echo $$ > {PID}; trap : TERM; "
        f"{train_argv(args, worker, num_workers, coordinator)}; code=$?; "
        'echo "=== exited with status $code at $(date -u +%FT%TZ)"; exit $code'
    )


def run_remote(
    args: argparse.Namespace,
    worker: int,
    num_workers: int,
    coordinator: str,
    detach_wait_s: int = DETACH_WAIT_S,
) -> str:
    """Starts the run in its own session (it survives the ssh session) logging to LOG."""
    inner = run_inner(args, worker, num_workers, coordinator)
    # Returning before the child has called setsid() would let the ssh session's end (SIGHUP
    # to its process group) kill the run before it starts: a loaded host once left a worker
    # with nothing in its log but the start line. So it waits for the pid the detached shell
    # writes once it is in its own session.
    return (
        f"cd {SRC} && printf '%s\\n' {shlex.quote(args.workdir)} > {WORKDIR_FILE} && "
        f'echo "=== worker {worker}: start at $(date -u +%FT%TZ)" >> {LOG} && rm -f {PID} && '
        f"{{ setsid nohup bash -c {shlex.quote(inner)} >> {LOG} 2>&1 < /dev/null & }} && "
        f"for _ in $(seq {detach_wait_s * 10}); do [ -s {PID} ] && break; sleep 0.1; done; "
        f'if [ -s {PID} ]; then echo "started pid $(cat {PID})"; else echo "the run did not '
        f'detach within {detach_wait_s} s; see {LOG}" >&2; exit 5; fi'
    )


def status_remote(worker: int) -> str:
    """Alive or not, the last log line and, on worker 0, the last checkpoint step."""
    checkpoint = (
        f"; [ -f {WORKDIR_FILE} ] && "
        f'{PYTHON} {SRC}/launch/last_checkpoint.py "$(cat {WORKDIR_FILE})"'
        if worker == 0
        else ""
    )
    progress = f"grep -E ' step [0-9]+/[0-9]+ ' {LOG} 2>/dev/null | tail -n 1"
    return (
        f'if {_running_test()}; then echo "running (pid $(cat {PID}))"; else echo "not running"; '
        f'fi; echo "last progress: $({progress})"; '
        f'echo "last log line: $(tail -n 1 {LOG} 2>/dev/null)"{checkpoint}; true'
    )


def stop_remote(wait_s: int) -> str:
    """SIGTERM to the run's process group, then waits (up to wait_s) for it to exit."""
    return (
        f'if {_running_test()}; then pid=$(cat {PID}); kill -TERM -- "-$pid"; '
        f'for _ in $(seq {int(wait_s)}); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; '
        f'if kill -0 "$pid" 2>/dev/null; then echo "still running after {int(wait_s)} s" >&2; '
        f'exit 4; fi; echo "stopped: $(tail -n 1 {LOG})"; else echo "not running"; fi'
    )


def logs_remote(lines: int, follow: bool) -> str:
    """Process 0's log; following it ends when the run does."""
    if not follow:
        return f"tail -n {int(lines)} {LOG}"
    return (
        f'if {_running_test()}; then tail -n {int(lines)} --pid="$(cat {PID})" -F {LOG}; '
        f"else tail -n {int(lines)} {LOG}; fi"
    )


# ------------------------------------------------------------------ execution


def echo(command: list[str], worker: int | None = None) -> None:
    """Prints a command the way it can be pasted into a shell."""
    prefix = "" if worker is None else f"[worker {worker}] "
    print(f"{prefix}$ {shlex.join(command)}", flush=True)


def run_local(args: argparse.Namespace, command: list[str], what: str) -> str:
    """Runs one command here (printing it); its stdout; LaunchError naming it if it fails."""
    echo(command)
    if args.dry_run:
        return ""
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise LaunchError(f"{what} failed (exit {result.returncode}): {shlex.join(command)}")
    return result.stdout


def on_workers(
    args: argparse.Namespace, workers: list[int], remote: Callable[[int], str], what: str
) -> dict[int, str]:
    """Runs remote(w) on every worker in parallel; {worker: output}; LaunchError on failure."""
    commands = {w: ssh(args, remote(w), worker=w) for w in workers}
    for w, command in commands.items():
        echo(command, w)
    if args.dry_run:
        return {w: "" for w in workers}
    procs = {
        w: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for w, command in commands.items()
    }
    outputs = {w: proc.communicate()[0] for w, proc in procs.items()}
    failed = []
    for w in workers:
        for line in outputs[w].splitlines():
            print(f"[worker {w}] {line}", flush=True)
        if procs[w].returncode != 0:
            failed.append(w)
    if failed:
        w = failed[0]
        last = (outputs[w].strip().splitlines() or ["(no output)"])[-1]
        others = f" (also workers {failed[1:]})" if len(failed) > 1 else ""
        raise LaunchError(
            f"worker {w}: {what} failed (exit {procs[w].returncode}){others}: {last} | "
            f"command: {shlex.join(commands[w])}"
        )
    return outputs


def endpoints(args: argparse.Namespace) -> list[str]:
    """Internal IP address of every worker, in worker order (from `describe`)."""
    if args.dry_run:
        # Nothing to ask in a dry run; --num_workers stands for the slice.
        return ["WORKER0_IP", *(f"WORKER{i}_IP" for i in range(1, args.num_workers))]
    node = json.loads(run_local(args, describe_command(args), "describing the TPU VM") or "{}")
    ips = [e.get("ipAddress", "") for e in node.get("networkEndpoints", [])]
    if not ips:
        raise LaunchError(
            f"TPU VM {args.name!r} has no workers (state {node.get('state')!r}); check "
            f"`{shlex.join(describe_command(args))}`."
        )
    return ips


def require_gcloud(args: argparse.Namespace) -> None:
    """One clear line when gcloud is not installed (dry runs need none)."""
    if not args.dry_run and shutil.which("gcloud") is None:
        raise LaunchError(
            f"`{args.command}` needs gcloud, which is not on PATH: install the Google Cloud SDK "
            "(https://cloud.google.com/sdk/docs/install), or use --dry_run to print the commands."
        )


# ------------------------------------------------------------------ subcommands


def do_create(args: argparse.Namespace) -> None:
    """Creates the slice; a queued resource is waited for until it is ACTIVE."""
    preflight_gate.gate_create(args)
    for command in create_commands(args):
        run_local(args, command, "creating the TPU VM")
    if not args.queued or args.dry_run:
        if args.queued:
            echo(queued_state_command(args))
        return
    deadline = time.monotonic() + args.wait_s
    while True:
        state = run_local(args, queued_state_command(args), "asking the queued resource").strip()
        print(f"queued resource {args.name}-qr: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {args.name}-qr is {state}; delete it and retry.")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {args.name}-qr still {state} after {args.wait_s} s")
        time.sleep(QUEUED_POLL_S)


def do_install(args: argparse.Namespace) -> None:
    """Copies this commit and the lock file to every worker and builds its venv there."""
    workers = list(range(len(endpoints(args))))
    commit = run_local(args, ["git", "-C", str(REPO), "rev-parse", "HEAD"], "git rev-parse")
    status = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]
    if run_local(args, status, "git status").strip():
        print(
            "warning: uncommitted changes are not sent (the workers get HEAD); commit first.",
            file=sys.stderr,
            flush=True,
        )
    if not Path(args.lock).is_file():
        raise LaunchError(f"--lock={args.lock}: no such file; run `bash requirements/lock.sh`.")
    with tempfile.TemporaryDirectory() as tmp:
        archive, lock = Path(tmp) / ARCHIVE_NAME, Path(tmp) / LOCK_NAME
        run_local(args, ["git", "-C", str(REPO), "archive", "--format=tar.gz",
                         f"--output={archive}", "HEAD"], "git archive")  # fmt: skip
        shutil.copyfile(args.lock, lock)
        for local in (archive, lock):
            run_local(args, _tpu_vm(args, "scp", str(local), f"{args.name}:~/", "--worker=all"),
                      f"copying {local.name} to the workers")  # fmt: skip
    on_workers(args, workers, lambda w: install_remote(args, commit.strip() or "HEAD"), "install")
    if not args.dry_run:
        print(f"installed on {len(workers)} worker(s)", flush=True)


def do_run(args: argparse.Namespace) -> None:
    """Checks every worker first; then starts the run on all of them."""
    ips = endpoints(args)
    if len(ips) > 1 and not args.workdir.startswith("gs://") and not args.allow_local_workdir:
        raise LaunchError(
            f"--workdir={args.workdir}: a {len(ips)}-worker slice needs a shared gs:// workdir "
            "(every worker writes its checkpoint shards there); use gs://BUCKET/DIR."
        )
    preflight_gate.gate_run(args, lambda: run_local(args, describe_command(args), "describe"))
    workers = list(range(len(ips)))
    on_workers(args, workers, lambda w: preflight_remote(), "the pre-start check")
    coordinator = f"{ips[0]}:{args.coordinator_port}"
    on_workers(
        args, workers, lambda w: run_remote(args, w, len(ips), coordinator), "starting the run"
    )


def do_status(args: argparse.Namespace) -> None:
    """Per worker: alive or not and the last log line; the last checkpoint step."""
    on_workers(args, list(range(len(endpoints(args)))), status_remote, "status")


def do_stop(args: argparse.Namespace) -> None:
    """SIGTERM on every worker: the run saves at a step all processes agree on, exits 0."""
    on_workers(args, list(range(len(endpoints(args)))), lambda w: stop_remote(args.wait_s), "stop")
    on_workers(args, [0], status_remote, "status")


def do_logs(args: argparse.Namespace) -> None:
    """Streams process 0's log (the only process that writes metrics) until the run ends."""
    command = ssh(args, logs_remote(args.lines, not args.no_follow), worker=args.worker)
    echo(command)
    if not args.dry_run:
        code = subprocess.run(command).returncode
        if code != 0:
            raise LaunchError(f"worker {args.worker}: logs failed (exit {code}): "
                              f"{shlex.join(command)}")  # fmt: skip


def do_delete(args: argparse.Namespace) -> None:
    """Deletes the slice (or its queued resource)."""
    for command in delete_commands(args):
        run_local(args, command, "deleting the TPU VM")


COMMANDS = {
    "create": do_create,
    "install": do_install,
    "run": do_run,
    "status": do_status,
    "stop": do_stop,
    "logs": do_logs,
    "delete": do_delete,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the launcher's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, action in COMMANDS.items():
        p = sub.add_parser(name, help=action.__doc__)
        p.add_argument("--name", required=True, help="TPU VM (node) name")
        p.add_argument("--zone", required=True, help="e.g. us-central2-b for v4")
        p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
        p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        p.add_argument("--queued", action="store_true", help="the slice is a queued resource")
        p.add_argument("--num_workers", type=int, default=1, help="dry runs only: workers")
        preflight_gate.add_arguments(p, name)
        if name == "create":
            p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v4-32")
            p.add_argument("--runtime_version", default="", help="default: by generation")
            p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
            p.add_argument("--wait_s", type=int, default=3600, help="--queued: wait for ACTIVE")
        if name == "install":
            p.add_argument(
                "--lock",
                default=str(REPO / "requirements" / "lock.txt"),
                help="pinned requirements to install (default: requirements/lock.txt)",
            )
            p.add_argument("--python_version", default="3.11", help="workers' Python (>= 3.11)")
            p.add_argument(
                "--pip_args",
                default="",
                help="extra pip arguments, e.g. '--no-index --find-links=DIR'",
            )
            p.add_argument(
                "--cpu_only",
                action="store_true",
                help="skip requirements/tpu.txt (libtpu): CPU-only workers",
            )
        if name == "run":
            p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
            p.add_argument("--workdir", required=True, help="shared path, gs://BUCKET/DIR")
            p.add_argument(
                "--env",
                action="append",
                default=[],
                metavar="NAME=VALUE",
                help="environment variable for the run (repeatable)",
            )
            p.add_argument("--tfds_data_dir", default="", help="same as --env TFDS_DATA_DIR=...")
            p.add_argument(
                "--coordinator_port",
                type=int,
                default=COORDINATOR_PORT,
                help="port of jax.distributed's coordinator on worker 0",
            )
            p.add_argument(
                "--allow_local_workdir",
                action="store_true",
                help="the workers share a file system (not gs://)",
            )
            p.add_argument("override", nargs="*", help="extra --config.field=value flags")
        if name == "stop":
            p.add_argument("--wait_s", type=int, default=900, help="wait this long for the save")
        if name == "logs":
            p.add_argument("--worker", type=int, default=0)
            p.add_argument("--lines", type=int, default=100)
            p.add_argument("--no_follow", action="store_true", help="print and return")
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command == "run":
        args.override = [*args.override, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        if args.tfds_data_dir:
            args.env.append(f"TFDS_DATA_DIR={args.tfds_data_dir}")
        bad = [e for e in args.env if "=" not in e or not e.split("=", 1)[0].isidentifier()]
        if bad:
            parser.error(f"--env {bad[0]!r}: expected NAME=VALUE")
    if args.command == "create" and not args.runtime_version:
        runtime_version(args.accelerator)  # fails early on an unknown generation
    return args


def main(argv: list[str]) -> int:
    """Runs one subcommand; failures are one line on stderr and exit status 1."""
    try:
        args = parse_args(argv)
        require_gcloud(args)
        COMMANDS[args.command](args)
    except (LaunchError, preflight_gate.PreflightRefused) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
