"""Runs `simclr_jax.main` in a subprocess for the multi-host and preemption tests, with hooks
that kill or preempt it at a chosen step; also the helpers the tests launch it with.

    SIMCLR_TEST_DEVICES=4 python tests/pod_worker.py --config=... --workdir=... [main.py flags]

Hooks (environment variables, all optional):
  SIMCLR_TEST_SIGTERM_AT=k      this process sends itself SIGTERM when step k has run
  SIMCLR_TEST_STOP_REQUESTED=1  with SIGTERM_AT: first write <workdir>/stop_requested, as a
                                deliberate stop (`launch/tpu.py stop`) does
  SIMCLR_TEST_KILL_AT=k         SIGKILL when step k has run (no clean-up of any kind)
  SIMCLR_TEST_KILL_AFTER_COMMIT=1  with KILL_AT: first wait until a checkpoint has committed
                                (async saves can lag the steps on a loaded machine)
  SIMCLR_TEST_KILL_IN_SAVE=k    SIGKILL while checkpoint k is being committed (files written,
                                not yet renamed to its final name)
  SIMCLR_TEST_SIGTERM_IN_RESTORE=1  SIGTERM while the workdir's checkpoint is being restored
  SIMCLR_TEST_SAME_GLOBAL_BATCH=1  every process feeds its rows of the batch ONE process would
                                see, so runs with different process counts train on equal data
  SIMCLR_TEST_SOCKET_BUFFER_BYTES=n  loopback socket buffers, as launch/simulate_pod.py sets
                                them (worker_env: 4 MiB; 0 = kernel default, ~40x slower steps)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV_PREFIX = "SIMCLR_TEST_"
SOCKET_BUFFER_BYTES = 4 << 20  # launch/simulate_pod.py's default
# XLA:CPU aborts a process whose devices wait at one collective longer than this: a deadlock
# then fails in minutes (why: conftest.py). The tests and every worker they start use it.
COLLECTIVE_WAIT_LIMIT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=300"


# ------------------------------------------------------------------ helpers for the tests


def free_port() -> int:
    """A TCP port nothing listens on right now (for the loopback coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_flags(workdir: str | Path, **overrides: object) -> list[str]:
    """main.py flags for a tiny deterministic pretraining run (R18 width 1, 16 px, batch 16)."""
    config = {
        "data.image_size": 16,
        "train_batch_size": 16,
        "eval_batch_size": 48,
        "data.eval_split": "test[:10]",
        "train_steps": 6,
        "warmup_steps": 1,
        "log_every_steps": 1,
        "checkpoint_every_steps": 2,
        "keep_checkpoints": 10,
        "knn_eval": False,
        **overrides,
    }
    return [
        "--config=configs/smoke.py:pretrain",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in config.items()),
    ]


def worker_env(devices: int, **hooks: object) -> dict[str, str]:
    """Environment of one worker: its device count and hooks. It inherits the test run's
    compilation cache (JAX_COMPILATION_CACHE_DIR, tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        {
            f"{ENV_PREFIX}DEVICES": str(devices),
            # Every program cached, so relaunches skip compiling: most of a relaunch's cost on
            # 2 CPU cores.
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            # The pytest process (conftest.py) runs with this precision; runs compared
            # bit for bit must compile the same programs.
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    hooks = {"socket_buffer_bytes": SOCKET_BUFFER_BYTES, **hooks}
    env.update({f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in hooks.items()})
    return env


def start(flags: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Starts one worker (same interpreter), its stdout and stderr going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *flags],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every process; kills them all if they outlive `timeout` (no hangs)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    return codes


def run_pod(
    num_processes: int,
    devices_per_process: int,
    flags: list[str],
    log_dir: Path,
    *,
    timeout: float = 300,
    hooks_for: dict[int, dict[str, object]] | None = None,
    extra_flags: list[str] = (),
) -> tuple[list[int], list[str]]:
    """Runs a simulated pod (loopback coordinator) to the end; (exit codes, logs)."""
    port, procs, logs = free_port(), [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    for pid in range(num_processes):
        hooks = (hooks_for or {}).get(pid, {})
        distributed = (
            [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}",
                f"--process_id={pid}",
            ]
            if num_processes > 1
            else []
        )
        logs.append(log_dir / f"process{pid}.log")
        env = worker_env(devices_per_process, **hooks)
        procs.append(start([*flags, *distributed, *extra_flags], env, logs[-1]))
    codes = wait_all(procs, timeout)
    return codes, [path.read_text() for path in logs]


# ------------------------------------------------------------------ the worker itself


def _hook(name: str) -> int | None:
    value = os.environ.get(ENV_PREFIX + name)
    return int(value) if value else None


def complete_steps(workdir: str | Path) -> list[int]:
    """Steps with a committed checkpoint (what a relaunch may resume from): Orbax names a
    checkpoint's directory by its step alone once committed, unfinished saves carry a suffix."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _workdir() -> str:
    """This worker's --workdir flag."""
    (workdir,) = [arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--workdir=")]
    return workdir


def _wait_for_a_committed_checkpoint(timeout: float = 300) -> None:
    """Blocks until this worker's workdir (its --workdir flag) holds a committed checkpoint."""
    workdir = _workdir()
    deadline = time.monotonic() + timeout
    while not complete_steps(workdir):
        if time.monotonic() > deadline:
            raise SystemExit(f"test hook: no checkpoint committed in {workdir} within {timeout} s")
        time.sleep(0.1)


def install_hooks() -> None:
    """Patches the library (in this process only) as the environment asks."""
    from simclr_jax import metrics

    sigterm_at, kill_at = _hook("SIGTERM_AT"), _hook("KILL_AT")
    real_add = metrics.MetricBuffer.add

    def add(self, step, step_metrics):
        real_add(self, step, step_metrics)
        if step == kill_at:
            if _hook("KILL_AFTER_COMMIT"):
                _wait_for_a_committed_checkpoint()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == sigterm_at:
            if _hook("STOP_REQUESTED"):
                from simclr_jax import preemption

                preemption.stop_marker(_workdir()).write_text("")
                print("test hook: stop marker written", flush=True)
            print(f"test hook: SIGTERM at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    metrics.MetricBuffer.add = add

    if _hook("SIGTERM_IN_RESTORE"):
        from simclr_jax import checkpoint

        real_restore = checkpoint.restore_state

        def restore_state(*args, **kwargs):
            print("test hook: SIGTERM while restoring", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return real_restore(*args, **kwargs)

        checkpoint.restore_state = restore_state

    kill_in_save = _hook("KILL_IN_SAVE")
    if kill_in_save is not None:
        from orbax.checkpoint._src.path import atomicity

        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            if self.get_final().name == str(kill_in_save):
                print(f"test hook: SIGKILL while committing {self.get()}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return await real_finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize

    if os.environ.get(ENV_PREFIX + "SAME_GLOBAL_BATCH"):
        from simclr_jax.data import backends

        real_iterator = backends.make_train_iterator

        def same_global_batch(*args, **kwargs):
            import jax

            index, count = jax.process_index(), jax.process_count()
            batches = real_iterator(*args, **kwargs, process_index=0, process_count=1)
            for batch in batches:
                rows = len(next(iter(batch.values()))) // count
                yield {k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}

        backends.make_train_iterator = same_global_batch  # what data.make_train_batches reads


def main() -> None:
    """Sets the device count before JAX starts, installs the hooks, runs main.py."""
    devices = os.environ.get(ENV_PREFIX + "DEVICES", "1")
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_WAIT_LIMIT_FLAG}"
    )
    sys.path.insert(0, str(REPO))
    install_hooks()
    from launch import loopback

    if _hook("SOCKET_BUFFER_BYTES"):
        loopback.start_loopback_socket_tuner(_hook("SOCKET_BUFFER_BYTES"))

    from simclr_jax import main as entry_point

    entry_point.run()


if __name__ == "__main__":
    main()
