#!/usr/bin/env python3
"""Cloud TPU VM pod launcher (stdlib only): create, install, run, supervise, status, stop, logs,
delete.

  python3 launch/tpu.py create  --name simclr --zone us-central2-b --accelerator v4-32 --spot
  python3 launch/tpu.py install --name simclr
  python3 launch/tpu.py run     --name simclr \
      --config configs/imagenet_pretrain.py:r50_1x --workdir gs://BUCKET/simclr/r50 \
      --env TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets
  python3 launch/tpu.py supervise --name simclr --config ... --workdir ...  # run, recreate on
                                                                            # preemption, resume
  python3 launch/tpu.py status  --name simclr     # node state, then per worker; 1 if not READY
  python3 launch/tpu.py stop    --name simclr     # stop marker, SIGTERM: save, exit 0
  python3 launch/tpu.py logs    --name simclr     # follows process 0
  python3 launch/tpu.py delete  --name simclr

`create` remembers the slice's flags (zone, project, accelerator, runtime version, spot, queued)
in $SIMCLR_TPU_STATE_DIR/<name>.json (default ~/.config/simclr_jax/tpu), so the other
subcommands need only --name. Every subcommand prints the exact commands it runs; --dry_run
prints them only. On the workers: ~/simclr_jax (this commit's source), ~/simclr_jax_venv
(Python >= 3.11 with requirements/lock.txt + tpu.txt), ~/simclr_jax_run.log (one log per
worker, appended by each run, whose part is copied to <workdir>/logs/ while it goes and at its
end), ~/simclr_jax_run.pid, ~/simclr_jax_run.id (the run's token, checked in its command line),
~/simclr_jax_run.exit (its exit status) and, on worker 0, ~/simclr_jax_run.claim (one start at a
time). Training's exit statuses: 0 finished or stopped on purpose, 2 configuration error, 42
preempted (checkpoint saved); `supervise` acts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import preflight_gate  # noqa: E402 - next to this script, which is not a package
from common import (  # noqa: E402 - the launchers' shared module, next to this script
    EXIT_CONFIG_ERROR,
    EXIT_FINISHED,
    EXIT_PREEMPTED,
    STOP_MARKER,
    jax_cache_dir,
    parse_env,
    trainer_args,
)

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
RUN_ID = '"$HOME/simclr_jax_run.id"'
WORKDIR_FILE = '"$HOME/simclr_jax_run.workdir"'
# "<run id> <exit status> <results>" written by the run's shell when training exits; <results>
# (worker 0 only): this (results.json written by this run), none, old (one from before this run)
# or error: <what the storage said>.
EXIT_FILE = '"$HOME/simclr_jax_run.exit"'
# One start at a time per slice: "<run id> <epoch s>" on worker 0, taken under CLAIM_LOCK.
CLAIM = '"$HOME/simclr_jax_run.claim"'
CLAIM_LOCK = '"$HOME/simclr_jax_run.claim.lock"'
CLAIM_TTL_S = 600  # a claim whose launcher vanished mid-start frees itself after this long
LOG_COPY_ERRORS = '"$HOME/simclr_jax_log_copy.err"'
LOG_COPY_WAIT_S = 120  # how long --delete_when_done waits for the workers' last log copies
ARCHIVE_NAME = "simclr_jax_src.tar.gz"
LOCK_NAME = "simclr_jax_lock.txt"
COORDINATOR_PORT = 8476  # JAX's default coordinator port on Cloud TPU
QUEUED_POLL_S = 30
DETACH_WAIT_S = 60  # for the started run to leave the ssh session
STATE_DIR_ENV = "SIMCLR_TPU_STATE_DIR"
STATE_KEYS = ("zone", "project", "accelerator", "runtime_version", "spot", "queued")
SSH_EXIT = 255  # ssh's own failure (connection, host key), as opposed to the remote command's
NOT_FOUND = "NOT_FOUND"
# Node states a slice passes through on its own; any other state but READY needs a new slice.
TRANSIENT_STATES = {"CREATING", "STARTING", "RESTARTING", "REPAIRING"}
# What a refused create says when the zone has no capacity (or the project no quota) now.
CAPACITY_ERRORS = ("resource_exhausted", "no more capacity", "quota", "stockout",
                   "insufficient capacity", "resource pool exhausted",
                   "resources are not available")  # fmt: skip
# TensorCores (v2-v5p) or chips (v5litepod, v6e) per accelerator-type size step, and the
# names people use for a generation that gcloud spells differently.
SIZE_STEP = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8, "v5litepod": 8, "v6e": 8}
SMALL_SIZES = {"v5litepod": (1, 4), "v6e": (1, 4)}
GENERATION_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e", "trillium": "v6e"}


class LaunchError(Exception):
    """A failure reported as one line: what failed, where, and the command."""


class Fatal(LaunchError):
    """A failure that ends supervision (a restart would not help)."""


class Output:
    """Prints whole lines from several threads; under `supervise` each line is timestamped."""

    def __init__(self) -> None:
        self.timestamps = False
        self._lock = threading.Lock()

    def say(self, line: str, stream=None) -> None:
        """One line, prefixed with the UTC time when timestamps are on."""
        if self.timestamps:
            line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}"
        with self._lock:
            print(line, file=stream or sys.stdout, flush=True)


OUT = Output()


# ------------------------------------------------------------------ remembered slices


def state_path(name: str) -> Path:
    """Where the flags a slice was created with are kept."""
    root = os.environ.get(STATE_DIR_ENV) or Path.home() / ".config" / "simclr_jax" / "tpu"
    return Path(root) / f"{name}.json"


def save_state(args: argparse.Namespace) -> None:
    """Remembers the slice's creation flags (zone, project, accelerator, version, spot, queued)."""
    path = state_path(args.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: getattr(args, key) for key in STATE_KEYS}
    path.write_text(json.dumps(state, indent=1) + "\n")


def load_state(name: str) -> dict | None:
    """The remembered flags of a slice, or None; LaunchError naming the file if it is not one
    this launcher wrote (not JSON, not an object, a key of the wrong type)."""
    path = state_path(name)
    if not path.is_file():
        return None
    fix = "move it away and pass --zone (or `create` again)"
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LaunchError(f"state file {path}: not valid JSON ({error}); {fix}") from None
    if not isinstance(state, dict):
        raise LaunchError(f"state file {path}: holds a {type(state).__name__}, not the object "
                          f"`create` writes; {fix}")  # fmt: skip
    for key, value in state.items():
        wanted = bool if key in ("spot", "queued") else str
        if key in STATE_KEYS and not isinstance(value, wanted):
            raise LaunchError(f"state file {path}: {key!r} is {value!r}, not a "
                              f"{wanted.__name__}; {fix}")  # fmt: skip
    return state


def resolve_slice(args: argparse.Namespace) -> None:
    """Fills the flags not given on the command line from the slice's state file."""
    if args.command == "create":
        return
    state = load_state(args.name)
    if state is None and not args.zone:
        raise LaunchError(
            f"unknown --name {args.name!r}: no state file {state_path(args.name)} (written by "
            "`create`); create the slice, or pass --zone (and --project) for one made elsewhere."
        )
    state = state or {}
    args.zone = args.zone or state.get("zone", "")
    args.project = args.project or state.get("project", "")
    args.queued = args.queued or bool(state.get("queued"))
    for key in ("accelerator", "runtime_version", "spot"):
        setattr(args, key, state.get(key, "" if key != "spot" else False))
    args.has_state = bool(state)


def hosts_of(accelerator: str) -> int:
    """Workers (hosts) of a slice type: v4-32 -> 4 (8 TensorCores a host), v5litepod-16 -> 4."""
    generation, _, size = accelerator.rpartition("-")
    if not size.isdigit():
        return 1
    if generation in ("v5litepod", "v6e"):
        return 1 if int(size) <= 8 else int(size) // 4
    return max(1, int(size) // 8)


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


def check_accelerator(accelerator: str) -> None:
    """LaunchError naming the fix for an accelerator type gcloud would refuse (v5e-16: gcloud
    says v5litepod-16; v4-33: v4 sizes go in steps of 8 TensorCores)."""
    generation, _, size = accelerator.rpartition("-")
    if generation in GENERATION_ALIASES:
        raise LaunchError(
            f"--accelerator={accelerator}: gcloud names this generation "
            f"{GENERATION_ALIASES[generation]!r}; use --accelerator "
            f"{GENERATION_ALIASES[generation]}-{size}."
        )
    if generation not in SIZE_STEP:
        return  # runtime_version() names the known generations (or --runtime_version is given)
    step, small = SIZE_STEP[generation], SMALL_SIZES.get(generation, ())
    if not size.isdigit() or not (int(size) in small or (int(size) and int(size) % step == 0)):
        sizes = ", ".join(map(str, [*small, step, 2 * step, 4 * step]))
        raise LaunchError(
            f"--accelerator={accelerator}: no such {generation} slice; the size after the dash "
            f"is one of {sizes}, ... (a multiple of {step}), e.g. {generation}-{step * 2}."
        )


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _tpu_vm(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    # IAP tunnelling of `tpu-vm ssh/scp` exists in gcloud's alpha track only (the GA commands
    # answer "unrecognized arguments: --tunnel-through-iap").
    iap = verb in ("ssh", "scp") and getattr(args, "tunnel_through_iap", False)
    track = ["alpha"] if iap else []
    return ["gcloud", *track, "compute", "tpus", "tpu-vm", verb, *rest, *_location(args)]


def _connection_flags(args: argparse.Namespace) -> list[str]:
    # A recreated slice has new host keys under the old names: checking them would stop every
    # ssh after a preemption. --quiet: gcloud must never wait for an answer on captured output.
    flags = ["--strict-host-key-checking=no", "--quiet"]
    if getattr(args, "internal_ip", False):
        flags.append("--internal-ip")
    if getattr(args, "tunnel_through_iap", False):
        flags.append("--tunnel-through-iap")
    return flags


def ssh(args: argparse.Namespace, command: str, worker: int | str = "all") -> list[str]:
    """gcloud ssh running one shell command on one worker (or all of them)."""
    return _tpu_vm(
        args, "ssh", args.name, f"--worker={worker}", *_connection_flags(args),
        f"--command={command}",
    )  # fmt: skip


def scp(args: argparse.Namespace, local: Path) -> list[str]:
    """gcloud scp of one local file into every worker's home directory."""
    return _tpu_vm(args, "scp", str(local), f"{args.name}:~/", "--worker=all",
                   *_connection_flags(args))  # fmt: skip


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
            f"--runtime-version={version}", *spot, "--quiet",
        ]]  # fmt: skip
    return [_tpu_vm(args, "create", args.name, f"--accelerator-type={args.accelerator}",
                    f"--version={version}", *spot, "--quiet")]  # fmt: skip


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


def _running_test(run_id: str = "") -> str:
    # True when this worker's run is alive: its pid lives AND is our run (its command line,
    # the detached shell's script, holds the run's token), not a process that got the same pid
    # after a reboot.
    own = f'"SIMCLR_JAX_RUN_ID=$(cat {RUN_ID} 2>/dev/null)"'
    token = shlex.quote(f"SIMCLR_JAX_RUN_ID={run_id}") if run_id else own
    return (
        f'{{ [ -s {PID} ] && [ -s {RUN_ID} ] && kill -0 "$(cat {PID})" 2>/dev/null && '
        f'grep -qaF -- {token} "/proc/$(cat {PID})/cmdline" 2>/dev/null; }}'
    )


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


def claim_remote(run_id: str, replaces: str = "") -> str:
    """Worker 0 takes the slice for one start, atomically (flock): refused while a run is going
    or another start holds a live claim. A claim lives until its run records an exit status,
    runs, or CLAIM_TTL_S passes without either (a launcher that vanished mid-start); `replaces`
    names the caller's own previous run, whose claim it may take over."""
    return (
        f"exec 8>> {CLAIM_LOCK} && flock -w 60 8 || {{ echo 'could not lock {CLAIM_LOCK}' >&2; "
        f'exit 6; }}; if {_running_test()}; then echo "refused: run $(cat {RUN_ID}) is going '
        f'on this slice (pid $(cat {PID})); `stop` it first" >&2; exit 6; fi; '
        f"if [ -s {CLAIM} ]; then read -r cid ct < {CLAIM}; age=$(( $(date +%s) - ${{ct:-0}} )); "
        f'ended=$(cut -d" " -f1 {EXIT_FILE} 2>/dev/null); '
        f'if [ "$cid" != {shlex.quote(replaces or "-")} ] && [ "$ended" != "$cid" ] && '
        f'[ "$age" -lt {CLAIM_TTL_S} ]; then echo "refused: another start (run $cid) is under way '
        f"on this slice since ${{age}} s; wait for it (a start interrupted without cleaning up "
        f'frees the slice {CLAIM_TTL_S} s after it began)" >&2; exit 6; fi; fi; '
        f"echo {shlex.quote(run_id)} $(date +%s) > {CLAIM} && echo 'claimed for run {run_id}'"
    )


def release_remote(run_id: str) -> str:
    """Gives up worker 0's claim if it is still this run's (a start that failed)."""
    return (
        f"exec 8>> {CLAIM_LOCK} && flock -w 60 8; if [ \"$(cut -d' ' -f1 {CLAIM} 2>/dev/null)\" "
        f"= {shlex.quote(run_id)} ]; then rm -f {CLAIM}; fi; true"
    )


def _results_fingerprint(workdir: str) -> str:
    """Shell printing what identifies <workdir>/results.json now: `none` when absent,
    `error: ...` when the storage cannot be asked, else its generation/mtime (changes on any
    rewrite), so before != after tells that the run wrote it."""
    path = shlex.quote(f"{workdir.rstrip('/')}/results.json")
    if workdir.startswith("gs://"):
        return (
            f"{{ out=$(gsutil stat {path} 2>&1) && printf '%s' \"$out\" | grep -iE "
            "'generation|update|hash' | cksum || case \"$out\" in *'No URLs matched'*) "
            'echo none;; *) echo "error: $(printf \'%s\' "$out" | tail -n 1)";; esac; }'
        )
    return f"{{ stat -c '%y %s %i' {path} 2>/dev/null || echo none; }}"


def train_argv(args: argparse.Namespace, worker: int, num_workers: int, coordinator: str) -> str:
    """The quoted training command line of one worker (explicit multi-host set-up)."""
    cluster = []
    if num_workers > 1:
        cluster = [
            f"--coordinator_address={coordinator}",
            f"--num_processes={num_workers}",
            f"--process_id={worker}",
        ]
    argv = trainer_args(args.config, args.workdir, args.override, cluster)
    env = ["env", *args.env] if args.env else []
    return " ".join([*map(shlex.quote, env), PYTHON, shlex.join(argv)])


def run_inner(
    args: argparse.Namespace, worker: int, num_workers: int, coordinator: str, run_id: str
) -> str:
    """The detached shell: trains, then records the exit status in EXIT_FILE (on worker 0
    with whether results.json is this run's) and logs it."""
    # It records its own pid (the process group's id, thanks to setsid, even where setsid had
    # to fork), which tells run_remote that it is detached, and traps TERM (a trap, not an
    # ignore, so Python keeps its own handler) to outlive `stop`'s signal to the group and still
    # write the exit status to the log. The run's token is in this script, hence in the shell's
    # command line, where the liveness check looks for it. The compilation cache lives in the
    # workdir, so a run resumed on a new slice finds its programs compiled (an --env wins).
    exports = [f"SIMCLR_JAX_RUN_ID={run_id}"]
    cache = jax_cache_dir(args.workdir, getattr(args, "jax_cache", ""))
    if cache:
        exports.append(f"JAX_COMPILATION_CACHE_DIR={cache}")
    before = after = verdict = ""
    if worker == 0:  # process 0 alone writes results.json
        fingerprint = _results_fingerprint(args.workdir)
        before = f"before=$({fingerprint}); "
        after = (
            f'after=$({fingerprint}); case "$after" in none) results=none;; error:*) '
            'results=$after;; "$before") results=old;; *) results=this;; esac; '
        )
        verdict = " (results.json: $results)"
    return (
        f"export {shlex.join(exports)} && echo $$ > {PID}; trap : TERM; {before}"
        f"{train_argv(args, worker, num_workers, coordinator)}; code=$?; results=; {after}"
        f'echo "{run_id} $code $results" > {EXIT_FILE}; '
        f'echo "=== exited with status $code at $(date -u +%FT%TZ){verdict}"; exit $code'
    )


def saved_log(workdir: str, worker: int, run_id: str) -> str:
    """Where a worker's log is copied in the workdir (one file per run, never overwritten by
    another run: a recreated worker starts a new log)."""
    return f"{workdir.rstrip('/')}/logs/worker{worker}-{run_id}.log"


def log_copier(workdir: str, worker: int, run_id: str, every_s: int) -> str:
    """Copies this run's part of the worker's log (from byte $1 on: the log is appended to by
    every run) into the workdir every `every_s` while the run lives, and once after it ends
    (gsutil for gs://, a file for a shared file system)."""
    target = saved_log(workdir, worker, run_id)
    part = f"tail -c +$(( ${{1:-0}} + 1 )) {LOG}"
    if workdir.startswith("gs://"):
        tmp = f'"$HOME/.simclr_jax_log_copy.{run_id}"'
        copy = f"{{ {part} > {tmp} && gsutil -q cp {tmp} {shlex.quote(target)}; }}"
    else:
        copy = (f"{{ mkdir -p {shlex.quote(os.path.dirname(target))} && "
                f"{part} > {shlex.quote(target)}; }}")  # fmt: skip
    # It looks every second, so the final copy follows the run's end closely; the marker
    # tells a launcher about to delete the slice that the last copy is done.
    alive = _running_test(run_id)
    return (
        f"while {alive}; do {copy}; for _ in $(seq {max(1, int(every_s))}); do {alive} || "
        f"break; sleep 1; done; done; {copy}; touch {log_copied(run_id)}"
    )


def log_copied(run_id: str) -> str:
    """The worker's marker that the log copier of run_id has made its last copy."""
    return f'"$HOME/.simclr_jax_log_copied.{run_id}"'


def wait_copied_remote(run_id: str, wait_s: int) -> str:
    """Waits (up to wait_s) for this worker's last log copy of run_id; exit 1 if it never came."""
    return (
        f"for _ in $(seq {int(wait_s)}); do [ -e {log_copied(run_id)} ] && exit 0; sleep 1; "
        f'done; echo "no last log copy after {int(wait_s)} s" >&2; exit 1'
    )


def run_remote(
    args: argparse.Namespace,
    worker: int,
    num_workers: int,
    coordinator: str,
    detach_wait_s: int = DETACH_WAIT_S,
    run_id: str = "",
) -> str:
    """Starts the run in its own session (it survives the ssh session) logging to LOG."""
    run_id = run_id or new_run_id()
    inner = run_inner(args, worker, num_workers, coordinator, run_id)
    copier = log_copier(args.workdir, worker, run_id, getattr(args, "log_copy_s", 60))
    # Returning before the child has called setsid() would let the ssh session's end (SIGHUP
    # to its process group) kill the run before it starts: a loaded host once left a worker
    # with nothing in its log but the start line. So it waits for the pid the detached shell
    # writes once it is in its own session, and gives up early when setsid itself failed.
    # A retried start (its ssh failed after the run began) finds its own run and reports it.
    # The log copier is born ignoring SIGHUP (inherited), so it needs no such wait.
    return (
        f'if {_running_test(run_id)}; then echo "started pid $(cat {PID}) (already)"; exit 0; '
        f"fi; cd {SRC} && printf '%s\\n' {shlex.quote(args.workdir)} > {WORKDIR_FILE} && "
        f"printf '%s\\n' {shlex.quote(run_id)} > {RUN_ID} && "
        f"logstart=$(stat -c %s {LOG} 2>/dev/null || echo 0) && "
        f'echo "=== worker {worker}: start at $(date -u +%FT%TZ), run {run_id}" >> {LOG} && '
        f"rm -f {PID} && "
        f"{{ setsid nohup bash -c {shlex.quote(inner)} >> {LOG} 2>&1 < /dev/null & }} && "
        f"bg=$! && bg_code= && for _ in $(seq {detach_wait_s * 10}); do [ -s {PID} ] && break; "
        f'if [ -z "$bg_code" ] && ! kill -0 "$bg" 2>/dev/null; then wait "$bg"; bg_code=$?; '
        f'[ "$bg_code" -ne 0 ] && break; fi; sleep 0.1; done; '
        f'if [ -s {PID} ]; then echo "started pid $(cat {PID})"; trap "" HUP; '
        f'{{ setsid nohup bash -c {shlex.quote(copier)} copier "$logstart" > /dev/null '
        f"2>> {LOG_COPY_ERRORS} "
        f'< /dev/null & }}; else echo "the run did not detach within {detach_wait_s} s'
        f'${{bg_code:+ (setsid exited with status $bg_code)}}; see {LOG}" >&2; exit 5; fi'
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
    meaning = (f"case $code in {EXIT_FINISHED}) m=' (finished, or stopped on purpose)';; "
               f"{EXIT_CONFIG_ERROR}) m=' (configuration error)';; {EXIT_PREEMPTED}) "
               "m=' (preempted, checkpoint saved)';; killed) m=' (no exit status recorded)';; "
               "*) m='';; esac")  # fmt: skip
    return (
        f'if {_running_test()}; then echo "running (pid $(cat {PID}))"; else {_last_exit()}; '
        f'{meaning}; echo "not running; last run ${{rid:-(none)}} exit status: $code$m"; '
        f'fi; echo "last progress: $({progress})"; '
        f'echo "last log line: $(tail -n 1 {LOG} 2>/dev/null)"{checkpoint}; true'
    )


def _last_exit() -> str:
    """Shell setting $rid (the last run's id), $code (its exit status; `killed` when its shell
    never recorded one, `none` when no run was started here) and $results (worker 0: whether
    results.json is that run's: this/old/none/error: ...)."""
    return (
        f"rid=$(cat {RUN_ID} 2>/dev/null); code=none; results=; "
        f'if [ -n "$rid" ]; then code=killed; read -r eid ecode eresults < {EXIT_FILE} '
        f'2>/dev/null; [ "$eid" = "$rid" ] && code=$ecode && results=$eresults; fi'
    )


def probe_remote(worker: int) -> str:
    """One machine-readable line for `supervise`: installed?, alive?, the last run's id and exit
    status (EXIT_FILE), its workdir; the log's last line before the exit status; on worker 0
    whether results.json is that run's, the last checkpoint and the last progress line."""
    checkpoint = (
        f'; echo "results: $results"; [ -f {WORKDIR_FILE} ] && [ -f {MARKER} ] && '
        f'{PYTHON} {SRC}/launch/last_checkpoint.py "$(cat {WORKDIR_FILE})"; '
        f"echo \"progress: $(grep -E ' step [0-9]+/[0-9]+ ' {LOG} 2>/dev/null | tail -n 1)\""
        if worker == 0
        else ""
    )
    return (
        f"[ -f {MARKER} ] && installed=1 || installed=0; "
        f"{_running_test()} && alive=1 || alive=0; {_last_exit()}; "
        f"last=$(grep -v '^=== ' {LOG} 2>/dev/null | tail -n 1); "
        f'echo "probe installed=$installed alive=$alive run=${{rid:--}} exit=$code '
        f'workdir=$(cat {WORKDIR_FILE} 2>/dev/null)"; echo "last log line: $last"{checkpoint}; true'
    )


def marker_remote() -> str:
    """Worker 0 writes <workdir>/stop_requested of its running run (gsutil for gs://), so that
    the SIGTERM that follows means "stop" (exit 0), not "preempted" (exit 42)."""
    marker = f'"${{wd%/}}/{STOP_MARKER}"'
    return (
        f"if ! {_running_test()}; then echo 'not running: no stop marker needed'; exit 0; fi; "
        f'wd=$(cat {WORKDIR_FILE}); cd {SRC} 2>/dev/null; case "$wd" in '
        f"gs://*) out=$(printf 'stop\\n' | gsutil -q cp - {marker} 2>&1);; "
        f"*) out=$(printf 'stop\\n' 2>&1 > {marker});; esac || {{ echo \"could not write the stop "
        f'marker {marker}: $out" >&2; exit 7; }}; echo "stop marker written: {marker}"'
    )


def stop_remote(wait_s: int, run_id: str = "") -> str:
    """SIGTERM to the run's process group (only run_id's, if given), then waits (up to wait_s)
    for it to exit."""
    return (
        f'if {_running_test(run_id)}; then pid=$(cat {PID}); kill -TERM -- "-$pid"; '
        f'for _ in $(seq {int(wait_s)}); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; '
        f'if kill -0 "$pid" 2>/dev/null; then echo "still running after {int(wait_s)} s" >&2; '
        f'exit 4; fi; echo "stopped: $(tail -n 1 {LOG})"; else echo "not running"; fi'
    )


def abort_remote(run_id: str, detach_wait_s: int = DETACH_WAIT_S) -> str:
    """Stops run_id on this worker, first waiting (up to detach_wait_s) for a start of it that
    is still under way (its id written, its pid not yet) to detach, so that it cannot slip by."""
    return (
        f'for _ in $(seq {detach_wait_s * 10}); do [ "$(cat {RUN_ID} 2>/dev/null)" = '
        f"{shlex.quote(run_id)} ] && [ ! -s {PID} ] || break; sleep 0.1; done; "
        f"{stop_remote(60, run_id)}"
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


def new_run_id() -> str:
    """A token naming one start of a run: sortable by time, unique."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def echo(command: list[str], worker: int | None = None) -> None:
    """Prints a command the way it can be pasted into a shell."""
    prefix = "" if worker is None else f"[worker {worker}] "
    OUT.say(f"{prefix}$ {shlex.join(command)}")


def run_local(args: argparse.Namespace, command: list[str], what: str) -> str:
    """Runs one command here (printing it); its stdout; LaunchError naming it if it fails."""
    echo(command)
    if args.dry_run:
        return ""
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise LaunchError(f"{what} failed (exit {result.returncode}): {shlex.join(command)}")
    return result.stdout


def connect(
    args: argparse.Namespace, command: list[str], label: str, quiet: bool = False
) -> tuple[int, str]:
    """Runs one gcloud ssh/scp, streaming its output lines (prefixed with `label`) as they come;
    retries with backoff when ssh itself fails (exit 255: network, a worker still booting)."""
    for attempt in range(1, args.ssh_attempts + 1):
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if not quiet:
                OUT.say(f"{label}{line.rstrip()}")
        code = proc.wait()
        if code != SSH_EXIT or attempt == args.ssh_attempts:
            return code, "".join(lines)
        delay = args.retry_delay_s * 2 ** (attempt - 1)
        last = lines[-1].strip() if lines else "no output"
        OUT.say(
            f"{label}ssh failed (exit {SSH_EXIT}: {last}); retry {attempt}/"
            f"{args.ssh_attempts - 1} in {delay:g} s"
        )
        time.sleep(delay)
    raise AssertionError("unreachable")


def connect_or_fail(args: argparse.Namespace, command: list[str], label: str, what: str) -> None:
    """Prints one gcloud ssh/scp and runs it (unless --dry_run); LaunchError if it fails."""
    echo(command)
    if args.dry_run:
        return
    code, _ = connect(args, command, label)
    if code != 0:
        raise LaunchError(f"{what} failed (exit {code}): {shlex.join(command)}")


def on_workers_results(
    args: argparse.Namespace,
    workers: list[int],
    remote: Callable[[int], str],
    quiet: bool = False,
    settle: bool = False,
) -> dict[int, tuple[int, str, list[str]]]:
    """Runs remote(w) on every worker in parallel; {worker: (exit status, output, command)}.
    With `settle`, Ctrl-C first lets the commands under way return (a start must not detach
    after the launcher has stopped looking)."""
    commands = {w: ssh(args, remote(w), worker=w) for w in workers}
    if not quiet:
        for w, command in commands.items():
            echo(command, w)
    if args.dry_run:
        return {w: (0, "", commands[w]) for w in workers}
    results: dict[int, tuple[int, str, list[str]]] = {}

    def one(w: int) -> None:
        code, output = connect(args, commands[w], f"[worker {w}] ", quiet)
        results[w] = (code, output, commands[w])

    threads = [threading.Thread(target=one, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():  # a timed join keeps Ctrl-C working
                thread.join(0.5)
    except KeyboardInterrupt:
        if settle:
            OUT.say("interrupted: letting the commands under way on the workers return",
                    sys.stderr)  # fmt: skip
            for thread in threads:
                thread.join(DETACH_WAIT_S + 30)
        raise
    return results


def failure(results: dict[int, tuple[int, str, list[str]]], what: str) -> str | None:
    """One line naming the first failed worker, its exit status, last line and command."""
    failed = [w for w in sorted(results) if results[w][0] != 0]
    if not failed:
        return None
    w = failed[0]
    code, output, command = results[w]
    last = (output.strip().splitlines() or ["(no output)"])[-1]
    others = f" (also workers {failed[1:]})" if len(failed) > 1 else ""
    return (
        f"worker {w}: {what} failed (exit {code}){others}: {last} | command: {shlex.join(command)}"
    )


def on_workers(
    args: argparse.Namespace, workers: list[int], remote: Callable[[int], str], what: str
) -> dict[int, str]:
    """Runs remote(w) on every worker in parallel; {worker: output}; LaunchError on failure."""
    results = on_workers_results(args, workers, remote)
    message = failure(results, what)
    if message:
        raise LaunchError(message)
    return {w: output for w, (_, output, _) in results.items()}


def node_state(args: argparse.Namespace, quiet: bool = False) -> tuple[str, dict]:
    """(state, description) of the node; state NOT_FOUND when it does not exist."""
    command = describe_command(args)
    if not quiet:
        echo(command)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        if NOT_FOUND in result.stderr:
            return NOT_FOUND, {}
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LaunchError(
            f"describing the TPU VM failed (exit {result.returncode}): {last} | command: "
            f"{shlex.join(command)}"
        )
    node = json.loads(result.stdout or "{}")
    return node.get("state", "UNKNOWN"), node


def queued_state(args: argparse.Namespace) -> str:
    """The queued resource's state (ACTIVE, SUSPENDED, ...); NOT_FOUND when it is gone."""
    result = subprocess.run(queued_state_command(args), capture_output=True, text=True)
    if result.returncode != 0:
        if NOT_FOUND in result.stderr:
            return NOT_FOUND
        raise LaunchError(f"asking the queued resource failed (exit {result.returncode}): "
                          f"{shlex.join(queued_state_command(args))}")  # fmt: skip
    return result.stdout.strip()


def not_found_error(args: argparse.Namespace) -> LaunchError:
    """The one line for a node that does not exist."""
    remembered = " (or `supervise` recreates it)" if getattr(args, "has_state", False) else ""
    return LaunchError(
        f"describing the TPU VM failed: {args.name!r} does not exist in {args.zone} "
        f"(NOT_FOUND); create it with `tpu.py create`{remembered}."
    )


def endpoints(args: argparse.Namespace) -> list[str]:
    """Internal IP address of every worker, in worker order (from `describe`)."""
    if args.dry_run:
        # Nothing to ask in a dry run; --num_workers stands for the slice.
        return ["WORKER0_IP", *(f"WORKER{i}_IP" for i in range(1, args.num_workers))]
    state, node = node_state(args)
    if state == NOT_FOUND:
        raise not_found_error(args)
    if state != "READY":
        raise LaunchError(
            f"TPU VM {args.name!r} is {state}, not READY; `tpu.py supervise` recreates a "
            "preempted slice (or `delete`, then `create`)."
        )
    ips = [e.get("ipAddress", "") for e in node.get("networkEndpoints", [])]
    if not ips:
        raise LaunchError(
            f"TPU VM {args.name!r} has no workers (state {state!r}); check "
            f"`{shlex.join(describe_command(args))}`."
        )
    return ips


def check_config_sent(args: argparse.Namespace) -> None:
    """The workers get `git archive HEAD`: a config file that is not in HEAD is not there (one
    changed since HEAD is there, unchanged)."""
    if args.dry_run:
        return
    config = Path(args.config.split(":", 1)[0])  # relative: to the checkout, as on the workers
    try:
        relative = (REPO / config).resolve().relative_to(REPO)
    except ValueError:
        raise LaunchError(
            f"--config={args.config}: {config} is outside the checkout {REPO}, so the workers "
            "do not get it; put it under configs/ and commit it."
        ) from None
    listed = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"HEAD:{relative}"],
                            capture_output=True)  # fmt: skip
    if listed.returncode != 0:
        raise LaunchError(f"--config={args.config}: {relative} is not committed, and the workers "
                          "get the last commit (`install` sends `git archive HEAD`); commit it, "
                          "then `install`.")  # fmt: skip
    changed = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--",
                              str(relative)], capture_output=True)  # fmt: skip
    if changed.returncode != 0:
        OUT.say(
            f"warning: {relative} has uncommitted changes; the workers have the committed "
            "version (commit, then `install`)",
            None if OUT.timestamps else sys.stderr,
        )


def require_gcloud(args: argparse.Namespace) -> None:
    """One clear line when gcloud is not installed (dry runs need none)."""
    if not args.dry_run and shutil.which("gcloud") is None:
        raise LaunchError(
            f"`{args.command}` needs gcloud, which is not on PATH: install the Google Cloud SDK "
            "(https://cloud.google.com/sdk/docs/install), or use --dry_run to print the commands."
        )


def check_workdir(args: argparse.Namespace, num_workers: int, supervised: bool = False) -> None:
    """A multi-host run needs a workdir every worker shares (gs://); a relative one would live
    under ~/simclr_jax, which `install` replaces; under supervise a host-local one would be lost
    with a recreated slice's disk."""
    shared = args.workdir.startswith("gs://") or args.allow_local_workdir
    if not args.workdir.startswith(("gs://", "/")):
        raise LaunchError(
            f"--workdir={args.workdir}: a relative workdir lands in the workers' ~/simclr_jax, "
            "which `install` replaces; use gs://BUCKET/DIR (or an absolute path)."
        )
    if supervised and not shared:
        raise LaunchError(
            f"--workdir={args.workdir}: supervise recreates a lost slice, and a host-local "
            "workdir goes with its disk; use gs://BUCKET/DIR (or --allow_local_workdir for a "
            "file system the workers share that outlives the slice)."
        )
    if num_workers > 1 and not args.workdir.startswith("gs://") and not args.allow_local_workdir:
        raise LaunchError(
            f"--workdir={args.workdir}: a {num_workers}-worker slice needs a shared gs:// workdir "
            "(every worker writes its checkpoint shards there); use gs://BUCKET/DIR."
        )


# ------------------------------------------------------------------ subcommands


def capacity_refusal(stderr: str) -> str:
    """gcloud's line when a create was refused for capacity or quota, else ''."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if any(marker in line.lower() for marker in CAPACITY_ERRORS):
            return line
    return ""


def create_with_capacity_wait(args: argparse.Namespace, command: list[str]) -> None:
    """Runs one create; a refusal for capacity or quota is tried again after a wait that doubles
    from --capacity_retry_s up to --capacity_retry_max_s, each try logged, for at most
    --capacity_wait_h hours (0: no waiting). Waiting for capacity is not a restart."""
    limit_s = getattr(args, "capacity_wait_h", 0.0) * 3600
    delay, waited, tries = getattr(args, "capacity_retry_s", 60.0), 0.0, 0
    while True:
        echo(command)
        if args.dry_run:
            return
        tries += 1
        result = subprocess.run(command, capture_output=True, text=True)
        for line in result.stdout.splitlines():
            OUT.say(line)
        if result.returncode == 0:
            return
        refusal = capacity_refusal(result.stderr)
        if not refusal:
            for line in result.stderr.strip().splitlines()[:-1]:
                OUT.say(line, None if OUT.timestamps else sys.stderr)
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LaunchError(f"creating the TPU VM failed (exit {result.returncode}): {last} | "
                              f"command: {shlex.join(command)}")  # fmt: skip
        if waited + delay > limit_s:
            hint = (
                "; `supervise` waits for capacity (--capacity_wait_h)"
                if limit_s == 0
                else f" after {tries} tries in {waited / 3600:.2g} h (--capacity_wait_h)"
            )
            raise Fatal(f"no capacity for {args.accelerator} in {args.zone}: {refusal}{hint}")
        OUT.say(f"no capacity for {args.accelerator} in {args.zone} (try {tries}: {refusal}); "
                f"trying again in {delay:g} s")  # fmt: skip
        time.sleep(delay)
        waited += delay
        delay = min(delay * 2, getattr(args, "capacity_retry_max_s", 1800.0))


def do_create(args: argparse.Namespace) -> None:
    """Creates the slice and remembers its flags; a queued resource is waited for (ACTIVE)."""
    preflight_gate.gate_create(args)
    create_slice(args)


def create_slice(args: argparse.Namespace) -> None:
    """`create` after its gate (also supervise's recreation, whose run passed the gate)."""
    for command in create_commands(args):
        create_with_capacity_wait(args, command)
    if not args.dry_run:
        args.runtime_version = args.runtime_version or runtime_version(args.accelerator)
        save_state(args)
    if not args.queued or args.dry_run:
        if args.queued:
            echo(queued_state_command(args))
        return
    deadline = time.monotonic() + args.wait_s
    while True:
        state = run_local(args, queued_state_command(args), "asking the queued resource").strip()
        OUT.say(f"queued resource {args.name}-qr: {state}")
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {args.name}-qr is {state}; delete it and retry.")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {args.name}-qr still {state} after {args.wait_s} s")
        time.sleep(getattr(args, "poll_s", QUEUED_POLL_S))


def do_install(args: argparse.Namespace) -> None:
    """Copies this commit and the lock file to every worker and builds its venv there."""
    workers = list(range(len(endpoints(args))))
    commit = run_local(args, ["git", "-C", str(REPO), "rev-parse", "HEAD"], "git rev-parse")
    status = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=normal"]
    changes = run_local(args, status, "git status").splitlines()
    untracked = [line[3:] for line in changes if line.startswith("??")]
    stream = None if OUT.timestamps else sys.stderr  # within `supervise`: its one event stream
    if len(untracked) < len(changes):
        OUT.say("warning: uncommitted changes are not sent (the workers get HEAD); commit first.",
                stream)  # fmt: skip
    if untracked:
        shown = ", ".join(untracked[:5]) + (f" and {len(untracked) - 5} more" if
                                             len(untracked) > 5 else "")  # fmt: skip
        OUT.say(
            f"warning: untracked files are not sent (the workers get HEAD): {shown}; "
            "`git add` and commit what the run needs (e.g. a configs/ file).",
            stream,
        )
    if not Path(args.lock).is_file():
        raise LaunchError(f"--lock={args.lock}: no such file; run `bash requirements/lock.sh`.")
    with tempfile.TemporaryDirectory() as tmp:
        archive, lock = Path(tmp) / ARCHIVE_NAME, Path(tmp) / LOCK_NAME
        run_local(args, ["git", "-C", str(REPO), "archive", "--format=tar.gz",
                         f"--output={archive}", "HEAD"], "git archive")  # fmt: skip
        shutil.copyfile(args.lock, lock)
        for local in (archive, lock):
            connect_or_fail(args, scp(args, local), "[scp] ", f"copying {local.name} to workers")
    on_workers(args, workers, lambda w: install_remote(args, commit.strip() or "HEAD"), "install")
    if not args.dry_run:
        OUT.say(f"installed on {len(workers)} worker(s)")


def start_run(args: argparse.Namespace, ips: list[str], replaces: str = "") -> str:
    """Claims the slice on worker 0 (one start at a time: a concurrent `run` is refused there),
    checks every worker, then starts the run on all; a worker that fails to start, or Ctrl-C
    during the start, stops the ones that did (no half-started pod left waiting for its peers).
    The run's id."""
    workers = list(range(len(ips)))
    coordinator = f"{ips[0]}:{args.coordinator_port}"
    run_id = new_run_id()
    on_workers(args, [0], lambda w: claim_remote(run_id, replaces), "claiming the slice")
    results: dict[int, tuple[int, str, list[str]]] = {}
    try:
        on_workers(args, workers, lambda w: preflight_remote(), "the pre-start check")
        results = on_workers_results(
            args,
            workers,
            lambda w: run_remote(args, w, len(ips), coordinator, run_id=run_id),
            settle=True,
        )
    except KeyboardInterrupt:
        OUT.say(f"interrupted while starting run {run_id}: stopping it on every worker",
                sys.stderr)  # fmt: skip
        on_workers_results(args, workers, lambda w: abort_remote(run_id), quiet=True)
        on_workers_results(args, [0], lambda w: release_remote(run_id), quiet=True)
        raise
    except LaunchError:
        on_workers_results(args, [0], lambda w: release_remote(run_id), quiet=True)
        raise
    message = failure(results, "starting the run")
    if message:
        started = [w for w in workers if results[w][0] == 0]
        if started:
            OUT.say(f"stopping the run on worker(s) {started}: it cannot go on without the others")
            stopped = on_workers_results(args, started, lambda w: stop_remote(60, run_id))
            left = [w for w in started if stopped[w][0] != 0]
            message += f"; stopped worker(s) {started}" + (f" except {left}" if left else "")
        on_workers_results(args, [0], lambda w: release_remote(run_id), quiet=True)
        raise LaunchError(message)
    return run_id


def do_run(args: argparse.Namespace) -> None:
    """Checks every worker first; then starts the run on all of them."""
    check_config_sent(args)
    ips = endpoints(args)
    check_workdir(args, len(ips))
    preflight_gate.gate_run(args, lambda: run_local(args, describe_command(args), "describe"))
    start_run(args, ips)


def do_status(args: argparse.Namespace) -> None:
    """The node's state; per worker: alive, last progress (step, ETA), last log line; worker 0:
    the last checkpoint step. Exit status 1 when the node is not READY."""
    if args.dry_run:
        on_workers(args, list(range(len(endpoints(args)))), status_remote, "status")
        return
    state, node = node_state(args, quiet=True)  # its state is the first line
    summary = f"node {args.name}: {state}"
    if args.queued:
        summary += f" (queued resource {args.name}-qr: {queued_state(args)})"
    if state == "READY":
        workers = len(node["networkEndpoints"])
        summary += f", {node.get('acceleratorType', '?')}, {workers} worker(s)"
    OUT.say(summary)
    if state == NOT_FOUND:
        raise not_found_error(args)
    if state != "READY":
        raise LaunchError(
            f"node {args.name} is {state}, not READY; `tpu.py supervise` recreates it and "
            "resumes the run (or `delete`, then `create`)."
        )
    on_workers(args, list(range(len(node["networkEndpoints"]))), status_remote, "status")


def do_stop(args: argparse.Namespace) -> None:
    """Writes <workdir>/stop_requested (from worker 0), then SIGTERM on every worker: the run
    saves at a step all processes agree on and exits 0 (without the marker: 42, preempted)."""
    workers = list(range(len(endpoints(args))))
    on_workers(args, [0], lambda w: marker_remote(), "writing the stop marker")
    on_workers(args, workers, lambda w: stop_remote(args.wait_s), "stop")
    on_workers(args, [0], status_remote, "status")


def read_saved_logs(args: argparse.Namespace) -> None:
    """Prints the copies of one worker's log kept in the workdir, oldest run first."""
    pattern = saved_log(args.workdir, args.worker, "*")
    if args.workdir.startswith("gs://"):
        command = ["gsutil", "cat", pattern]
        echo(command)
        if args.dry_run:
            return
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            said = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LaunchError(f"no saved log matches {pattern} (gsutil: {said})")
        return
    paths = sorted(Path(os.path.dirname(pattern)).glob(os.path.basename(pattern)))
    if not paths:
        raise LaunchError(f"no saved log of worker {args.worker} in {args.workdir}/logs")
    for path in paths:
        OUT.say(f"=== {path}")
        sys.stdout.write(path.read_text())
        sys.stdout.flush()


def do_logs(args: argparse.Namespace) -> None:
    """Streams a worker's log (process 0's by default, the one with metrics) until the run
    ends; with --workdir, prints the copies saved there (also when the slice is gone)."""
    if args.workdir:
        read_saved_logs(args)
        return
    command = ssh(args, logs_remote(args.lines, not args.no_follow), worker=args.worker)
    connect_or_fail(args, command, "", f"worker {args.worker}: logs")


def delete_slice(args: argparse.Namespace, missing_ok: bool) -> None:
    """Deletes the node (and its queued resource); a slice already gone is fine if missing_ok."""
    for command in delete_commands(args):
        echo(command)
        if args.dry_run:
            continue
        result = subprocess.run(command, capture_output=True, text=True)
        for line in result.stdout.splitlines():
            OUT.say(line)
        if result.returncode != 0 and missing_ok and NOT_FOUND in result.stderr:
            OUT.say(f"{args.name}{' (queued resource)' if args.queued else ''} was already gone")
        elif result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LaunchError(
                f"deleting the TPU VM failed (exit {result.returncode}): {last} | command: "
                f"{shlex.join(command)}"
            )


def do_delete(args: argparse.Namespace) -> None:
    """Deletes the slice (its queued resource too, if it was made as one) and forgets it; a
    slice that is already gone is only forgotten."""
    delete_slice(args, missing_ok=True)
    if not args.dry_run:
        state_path(args.name).unlink(missing_ok=True)


# ------------------------------------------------------------------ supervise


def event(message: str) -> None:
    """One timestamped line about what `supervise` saw or did."""
    OUT.say(message)


def saved_run_verdict(args: argparse.Namespace, run_id: str) -> str:
    """For a gs:// workdir, when the slice is gone: worker 0's exit line of run_id in the copy
    of its log saved there ('' when there is none); a storage error is shown, not guessed."""
    if not args.workdir.startswith("gs://") or not run_id:
        return ""
    url = saved_log(args.workdir, 0, run_id)
    result = subprocess.run(["gsutil", "cat", url], capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "No URLs matched" not in said:
            event(f"storage error: reading {url} from here failed: {said}")
        return ""
    ends = [line for line in result.stdout.splitlines() if line.startswith("=== exited")]
    return ends[-1] if ends else ""


def slice_trouble(args: argparse.Namespace, since: dict) -> tuple[str, str, dict]:
    """(why the slice needs recreating or '', node state, node description); a node passing
    through CREATING/REPAIRING/... is given --not_ready_s before it counts as broken."""
    if args.queued:
        state = queued_state(args)
        if state != "ACTIVE":
            return f"queued resource {args.name}-qr is {state}", "", {}
    state, node = node_state(args, quiet=True)
    if state == "READY":
        since.clear()
        return "", state, node
    if state in TRANSIENT_STATES:
        first = since.setdefault(state, time.monotonic())
        if time.monotonic() - first < args.not_ready_s:
            return "", state, node
        return f"node {args.name} is still {state} after {args.not_ready_s:g} s", state, node
    return f"node {args.name} is {'gone' if state == NOT_FOUND else state}", state, node


def recreate(args: argparse.Namespace) -> None:
    """Deletes what is left of the slice and creates it again with its remembered flags."""
    event(f"deleting {args.name}{' and its queued resource' if args.queued else ''}")
    delete_slice(args, missing_ok=True)
    event(f"creating {args.name} ({args.accelerator}{', spot' if args.spot else ''}"
          f"{', queued' if args.queued else ''})")  # fmt: skip
    create_slice(args)


def probe(args: argparse.Namespace, workers: list[int]) -> dict[int, dict[str, str]] | None:
    """Each worker's probe line as a dict; None when a worker could not be asked."""
    results = on_workers_results(args, workers, probe_remote, quiet=True)
    probes = {}
    for w, (code, output, _) in results.items():
        found = re.search(
            r"probe installed=(\d) alive=(\d) run=(\S+) exit=(\S+) workdir=(.*)", output
        )
        if code != 0 or not found:
            return None
        installed, alive, run_id, code_text, workdir = found.groups()
        probes[w] = {"installed": installed, "alive": alive, "run": run_id, "exit": code_text,
                     "workdir": workdir.strip()}  # fmt: skip
        for key, pattern in (("last", r"last log line: (.*)"), ("progress", r"progress: (.*)"),
                             ("checkpoint", r"last checkpoint: step (\d+)"),
                             ("results", r"results: (.*)")):  # fmt: skip
            match = re.search(pattern, output)
            probes[w][key] = match.group(1).strip() if match else ""
    return probes


class Supervisor:
    """Keeps one run going on one slice until it finishes, is stopped on purpose, fails with a
    configuration error, fails twice from the same checkpoint, or has been restarted
    --max_restarts times. The verdict comes from where the run is: each worker's recorded exit
    status and worker 0's check that results.json was written by this run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = False  # a run was started or adopted and is not accounted for yet
        self.run_id = ""  # the run started or adopted last
        self.restarts = 0
        self.failed_from: str | None = None  # last checkpoint when the run last failed
        self.since: dict[str, float] = {}
        self.progress = ""
        self.outcome = ""  # "finished" or "stopped" once supervision ends
        # The workers whose last log copies a deletion awaits: those of the READY slice where
        # the run was seen to finish (none when the end was read from the saved log).
        self.finished_on: list[int] = []

    def restart(self, reason: str) -> None:
        """Counts a restart of the started run; Fatal once the budget is spent."""
        self.started = False
        self.restarts += 1
        if self.restarts > self.args.max_restarts:
            raise Fatal(f"gave up after {self.args.max_restarts} restart(s): {reason}")
        event(f"restart {self.restarts}/{self.args.max_restarts}: {reason}")

    def start(self) -> None:
        """Starts the run on the READY slice, installing first where needed."""
        ips = endpoints(self.args)
        probes = probe(self.args, list(range(len(ips))))
        if probes is None or any(p["installed"] != "1" for p in probes.values()):
            event(f"installing on {self.args.name}")
            do_install(self.args)
        self.run_id = start_run(self.args, ips, replaces=self.run_id)
        self.started = True
        event(f"started run {self.run_id} on {len(ips)} worker(s)")

    def end(self, outcome: str, message: str) -> bool:
        self.outcome = outcome
        event(message)
        return True

    def poll(self) -> bool:
        """One look at the slice and the run; True when supervision is over."""
        args = self.args
        trouble, state, node = slice_trouble(args, self.since)
        if trouble:
            if self.started:
                verdict = saved_run_verdict(args, self.run_id)
                if "results.json: this" in verdict:
                    return self.end("finished", f"finished: run {self.run_id} wrote "
                                    f"{args.workdir}/results.json ({verdict})")  # fmt: skip
                self.restart(f"{trouble}; recreating it and resuming the run")
            else:
                event(f"{trouble}; recreating it (no run was going: not a restart)")
            recreate(args)
            self.start()
            return False
        if state != "READY":
            event(f"node {args.name} is {state}; waiting")
            return False
        probes = probe(args, list(range(len(node["networkEndpoints"]))))
        if probes is None:
            event("a worker did not answer (ssh failed); asking again at the next poll")
            return False
        return self.judge(probes)

    def stop_workers(self, workers: list[int]) -> None:
        on_workers_results(self.args, workers, lambda w: stop_remote(120), quiet=True)

    def wait_for_log_copies(self) -> None:
        """Lets each worker's log copier make its last copy (a second or so after the run's
        end) before the slice goes: deleting it first would lose the log's last lines."""
        wait = wait_copied_remote(self.run_id, LOG_COPY_WAIT_S)
        results = on_workers_results(self.args, self.finished_on, lambda w: wait, quiet=True)
        for w, (code, output, _) in sorted(results.items()):
            if code != 0:
                said = (output.strip().splitlines() or [f"exit {code}"])[-1]
                event(f"worker {w}: {said}; the saved log may lack its end")

    def judge(self, probes: dict[int, dict[str, str]]) -> bool:
        """Acts on the probes of a READY slice's workers; True when supervision is over."""
        args = self.args
        alive = [w for w, p in probes.items() if p["alive"] == "1"]
        foreign = [w for w in alive if probes[w]["workdir"] != args.workdir]
        if foreign:
            raise Fatal(f"worker {foreign[0]} runs another run (workdir "
                        f"{probes[foreign[0]]['workdir']}); `stop` it first.")  # fmt: skip
        if not self.started:
            if alive and len(alive) == len(probes):
                self.started, self.run_id = True, probes[0]["run"]
                event(f"run {self.run_id} of {args.workdir} is going on {args.name}; "
                      "watching it")  # fmt: skip
                return False
            if alive:
                event(f"the run goes on worker(s) {alive} only; stopping it to start it anew")
                self.stop_workers(alive)
            event(f"starting the run of {args.workdir} on {args.name}")
            self.start()
            return False
        if len(alive) == len(probes):
            if probes[0]["progress"] and probes[0]["progress"] != self.progress:
                self.progress = probes[0]["progress"]
                event(f"running: {self.progress}")
            return False
        ended = {w: p["exit"] for w, p in probes.items() if p["alive"] == "0"}
        if any(p["run"] not in (self.run_id, "-") for p in probes.values()):
            other = next(w for w, p in probes.items() if p["run"] not in (self.run_id, "-"))
            raise Fatal(
                f"worker {other} has run {probes[other]['run']}, not {self.run_id}: "
                "another launcher started a run on this slice; supervise it alone."
            )
        config = [w for w, code in ended.items() if code == str(EXIT_CONFIG_ERROR)]
        if config:
            if alive:
                self.stop_workers(alive)
            w = config[0]
            raise Fatal(f"worker {w}: the run exited with status {EXIT_CONFIG_ERROR} "
                        f"(configuration error), which a restart cannot fix: "
                        f"{probes[w]['last']}")  # fmt: skip
        clean = (str(EXIT_FINISHED), str(EXIT_PREEMPTED))
        crashed = [w for w, code in ended.items() if code not in clean]
        if alive and not crashed:
            return False  # some workers saved and exited; the others are finishing the save
        if alive:
            event(f"worker {crashed[0]} died; stopping worker(s) {alive}")
            self.stop_workers(alive)
        results = probes[0]["results"]
        if not crashed and ended.get(0) == str(EXIT_FINISHED):
            if results == "this":
                self.finished_on = list(probes)
                return self.end("finished", f"finished: run {self.run_id} wrote "
                                f"{args.workdir}/results.json")  # fmt: skip
            if results.startswith("error"):
                raise Fatal(f"run {self.run_id} exited with status 0, but worker 0 could not "
                            f"read {args.workdir}/results.json: {results}; fix the storage "
                            "access, then `supervise` again (not restarted).")  # fmt: skip
            return self.end("stopped", f"run {self.run_id} was stopped on purpose (exit "
                            f"{EXIT_FINISHED} without results.json: {args.workdir}/{STOP_MARKER} "
                            "was set, e.g. by `tpu.py stop`); not restarting it; `supervise` "
                            "again resumes it")  # fmt: skip
        if not crashed:
            where = probes[0]["checkpoint"] or "none"
            self.restart(f"the run was preempted (exit {EXIT_PREEMPTED}, last checkpoint: "
                         f"{where}); starting it again")  # fmt: skip
        else:
            w = crashed[0]
            where = probes[0]["checkpoint"] or "none"
            reason = (f"worker {w} exited with status {probes[w]['exit']} (last checkpoint: "
                      f"{where}): {probes[w]['last']}")  # fmt: skip
            if where == self.failed_from:
                raise Fatal(f"the run failed twice from the same checkpoint ({where}), so a "
                            f"restart will not fix it: {reason}")  # fmt: skip
            self.failed_from = where
            self.restart(f"{reason}; starting it again")
        self.start()
        return False


MAX_FAILED_POLLS = 10  # consecutive polls that failed (gcloud errors) before giving up


def do_supervise(args: argparse.Namespace) -> None:
    """Starts the run if needed and keeps it going: a preempted, deleted or broken slice is
    recreated with its remembered flags, reinstalled and the run resumed from its checkpoint."""
    if args.dry_run:
        raise LaunchError("supervise acts on what it observes, so it has no dry run; "
                          "`run --dry_run` prints the start commands.")  # fmt: skip
    if not args.has_state:  # a slice made elsewhere: remember it as it is now
        state, node = node_state(args, quiet=True)
        if state == NOT_FOUND:
            raise LaunchError(
                f"{args.name!r} does not exist in {args.zone} (NOT_FOUND) and `create` has not "
                f"made it (no state file {state_path(args.name)}), so supervise does not know "
                "how to make it; create it with `tpu.py create`, then supervise."
            )
        scheduling = node.get("schedulingConfig", {})
        args.accelerator = node.get("acceleratorType", "")
        args.runtime_version = node.get("runtimeVersion", "")
        args.spot = bool(
            node.get("spot") or scheduling.get("spot") or scheduling.get("preemptible")
        )
        save_state(args)
    check_workdir(args, hosts_of(args.accelerator), supervised=True)
    check_config_sent(args)
    if not args.skip_preflight:
        preflight_gate.check(args.config, args.accelerator, args.override)
    OUT.timestamps = True
    event(f"supervising {args.name} ({args.accelerator}{', spot' if args.spot else ''}"
          f"{', queued' if args.queued else ''}): run in {args.workdir}, poll every "
          f"{args.poll_s:g} s, at most {args.max_restarts} restart(s), waiting up to "
          f"{args.capacity_wait_h:g} h for capacity")  # fmt: skip
    check_storage_here(args)
    supervisor, failed_polls = Supervisor(args), 0
    while True:
        try:
            if supervisor.poll():
                break
            failed_polls = 0
        except Fatal:
            raise
        except LaunchError as error:
            # A failed gcloud call (a worker still booting, an API hiccup) is tried again at the
            # next poll; only a run that had started counts a restart when it is recovered.
            failed_polls += 1
            if failed_polls >= MAX_FAILED_POLLS:
                raise LaunchError(f"{failed_polls} polls in a row failed; last: {error}") from None
            event(f"error: {error}; trying again in {args.poll_s:g} s")
        time.sleep(args.poll_s)
    if args.delete_when_done and supervisor.outcome == "finished":
        supervisor.wait_for_log_copies()
        event(f"deleting {args.name} (--delete_when_done)")
        do_delete(args)


def check_storage_here(args: argparse.Namespace) -> None:
    """Shows, once, a gs:// workdir this machine cannot read (gsutil's own words): supervise
    still works (worker 0 judges the run's end), but cannot read a lost slice's saved log."""
    if not args.workdir.startswith("gs://"):
        return
    url = f"{args.workdir.rstrip('/')}/results.json"
    try:
        result = subprocess.run(["gsutil", "stat", url], capture_output=True, text=True)
    except FileNotFoundError:
        event("warning: no gsutil on this machine; worker 0 alone judges the run's end")
        return
    said = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    if result.returncode != 0 and "No URLs matched" not in said:
        event(f"storage error: `gsutil stat {url}` failed here (exit {result.returncode}): "
              f"{said}; supervise goes on (worker 0 judges the run's end)")  # fmt: skip


COMMANDS = {
    "create": do_create,
    "install": do_install,
    "run": do_run,
    "supervise": do_supervise,
    "status": do_status,
    "stop": do_stop,
    "logs": do_logs,
    "delete": do_delete,
}


def add_install_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `install` (also taken by `supervise`, which reinstalls a recreated slice)."""
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
        help="skip requirements/tpu.txt (what jax[tpu] adds to the lock): CPU-only workers",
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `run` (also taken by `supervise`)."""
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
    p.add_argument(
        "--jax_cache",
        default="",
        help="JAX compilation cache dir (default <workdir>/jax_cache, local or gs://; 'none': off)",
    )
    p.add_argument(
        "--log_copy_s", type=int, default=60, help="copy each worker's log to <workdir>/logs"
    )


def training_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    """Splits the arguments the launcher does not know into training's config overrides
    (--config.FIELD=VALUE, or --config.FIELD VALUE) and the rest (misspelled launcher flags)."""
    overrides, unknown, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--config.") and "=" in arg:
            overrides.append(arg)
        elif arg.startswith("--config.") and extra[i + 1 :][:1] and not extra[i + 1][:2] == "--":
            overrides += [arg, extra[i + 1]]
            i += 1
        else:
            unknown.append(arg)
        i += 1
    return overrides, unknown


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the launcher's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, action in COMMANDS.items():
        p = sub.add_parser(name, help=action.__doc__, allow_abbrev=False)
        p.add_argument("--name", required=True, help="TPU VM (node) name")
        p.add_argument(
            "--zone", required=name == "create", default="",
            help="e.g. us-central2-b for v4 (default: the one `create` remembered)",
        )  # fmt: skip
        p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
        p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        p.add_argument("--queued", action="store_true", help="the slice is a queued resource")
        p.add_argument("--num_workers", type=int, default=1, help="dry runs only: workers")
        p.add_argument("--internal_ip", action="store_true", help="ssh to internal IPs")
        p.add_argument(
            "--tunnel_through_iap", action="store_true", help="ssh through IAP (no external IP)"
        )
        p.add_argument("--ssh_attempts", type=int, default=4, help="tries when ssh exits 255")
        p.add_argument("--retry_delay_s", type=float, default=5.0, help="first retry's delay")
        preflight_gate.add_arguments(p, name)
        if name == "create":
            p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v4-32")
            p.add_argument("--runtime_version", default="", help="default: by generation")
            p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
        if name in ("create", "supervise"):
            p.add_argument("--wait_s", type=int, default=3600, help="--queued: wait for ACTIVE")
        if name in ("install", "supervise"):
            add_install_flags(p)
        if name in ("run", "supervise"):
            add_run_flags(p)
        if name == "create":
            p.add_argument(
                "--capacity_wait_h", type=float, default=0.0,
                help="retry a create refused for capacity or quota this long (hours)",
            )  # fmt: skip
        if name == "supervise":
            p.add_argument(
                "--capacity_wait_h", type=float, default=12.0,
                help="recreating: retry a create refused for capacity or quota this long (hours)",
            )  # fmt: skip
            p.add_argument(
                "--delete_when_done", action="store_true",
                help="delete the slice once the run has finished and the workers' logs are copied "
                "(not when it stopped or failed)",
            )  # fmt: skip
        if name in ("create", "supervise"):
            p.add_argument(
                "--capacity_retry_s",
                type=float,
                default=60,
                help="first wait after a capacity refusal (doubles each try)",
            )
            p.add_argument("--capacity_retry_max_s", type=float, default=1800,
                           help="longest wait between create tries")  # fmt: skip
        if name == "supervise":
            p.add_argument("--poll_s", type=float, default=60, help="seconds between checks")
            p.add_argument("--max_restarts", type=int, default=10,
                           help="restarts of a started run, then give up")  # fmt: skip
            p.add_argument(
                "--not_ready_s", type=float, default=900,
                help="a node CREATING/REPAIRING/... this long is recreated",
            )  # fmt: skip
        if name == "stop":
            p.add_argument("--wait_s", type=int, default=900, help="wait this long for the save")
        if name == "logs":
            p.add_argument("--worker", type=int, default=0)
            p.add_argument("--lines", type=int, default=100)
            p.add_argument("--no_follow", action="store_true", help="print and return")
            p.add_argument(
                "--workdir", default="", help="print the worker's log copies saved there instead"
            )
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("run", "supervise", "create")
    args.override, unknown = training_overrides(extra) if takes_overrides else ([], extra)
    if unknown:
        what = (" (the launcher's flags are in `tpu.py " + args.command + " --help`; training "
                "takes only --config.FIELD=VALUE)") if takes_overrides else ""  # fmt: skip
        raise LaunchError(f"{args.command}: unrecognized arguments: {shlex.join(unknown)}{what}")
    if args.command == "create" and args.override and not args.config:
        raise LaunchError(f"create: {args.override[0]} overrides --config, which is not given")
    if args.command in ("run", "supervise"):
        if args.tfds_data_dir:
            args.env.append(f"TFDS_DATA_DIR={args.tfds_data_dir}")
        try:
            parse_env(args.env)
        except ValueError as error:
            raise LaunchError(str(error)) from None
    if args.internal_ip and args.tunnel_through_iap:
        raise LaunchError("--internal_ip and --tunnel_through_iap exclude each other (gcloud "
                          "takes one way to reach the workers); pass one.")  # fmt: skip
    if args.command in ("create", "supervise") and args.capacity_wait_h < 0:
        raise LaunchError(f"--capacity_wait_h={args.capacity_wait_h:g}: must be >= 0")
    if args.command == "supervise" and args.max_restarts < 0:
        raise LaunchError(f"--max_restarts={args.max_restarts}: must be >= 0 (0: never restart)")
    if args.command == "supervise" and args.poll_s <= 0:
        raise LaunchError(f"--poll_s={args.poll_s:g}: must be > 0")
    if args.ssh_attempts < 1:
        raise LaunchError(f"--ssh_attempts={args.ssh_attempts}: must be >= 1")
    if args.command == "create":
        check_accelerator(args.accelerator)
        if not args.runtime_version:
            runtime_version(args.accelerator)  # fails early on an unknown generation
    return args


def main(argv: list[str]) -> int:
    """Runs one subcommand; failures are one line on stderr and exit status 1."""
    args = None
    try:
        args = parse_args(argv)
        resolve_slice(args)
        require_gcloud(args)
        COMMANDS[args.command](args)
    except (LaunchError, preflight_gate.PreflightRefused) as error:
        OUT.say(f"error: {error}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        what = args.command if args else "the launcher"
        OUT.say(f"interrupted: {what} stopped here (a started run goes on; `status` shows it)",
                sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
