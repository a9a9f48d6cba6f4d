"""Where one step of a simulated pod goes: compute, each collective, host work.

    PYTHONPATH=. python benchmarks/pod_step.py [--socket_buffer_bytes 0] \
        [--num_processes 2 --devices_per_process 4] [--trace_step 3] -- [main.py flags]

Runs the smoke pretraining config as a simulated pod (launch/simulate_pod.py's processes),
times every step on the host (step call, block_until_ready, the preemption sync point, metric
flushing) and records a jax.profiler trace of step --trace_step in process 0, then prints
that step's XLA ops by total time per device thread: each all-reduce / all-gather on its
own line, everything else summed as compute. --socket_buffer_bytes 0 is the setting before
the fix (kernel default loopback socket buffers).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def instrument(trace_step: int, trace_dir: str) -> None:
    """Patches this process's train loop pieces with host timers and the profiler trace."""
    import jax

    from simclr_jax import metrics, preemption

    last = [time.perf_counter()]
    real_add, real_sync = metrics.MetricBuffer.add, preemption.PreemptionWatcher.reached_sync_point

    def add(self, step, step_metrics):
        dispatched = time.perf_counter()
        jax.block_until_ready(step_metrics)  # the step's device time, collectives included
        done = time.perf_counter()
        real_add(self, step, step_metrics)
        print(
            f"POD_STEP step={step} host_before_dispatch+dispatch={dispatched - last[0]:.3f}s "
            f"device_wait={done - dispatched:.3f}s",
            flush=True,
        )
        if step == trace_step - 1 and jax.process_index() == 0:
            jax.profiler.start_trace(trace_dir)
        if step == trace_step and jax.process_index() == 0:
            jax.profiler.stop_trace()
        last[0] = time.perf_counter()

    def reached_sync_point(self, step):
        started = time.perf_counter()
        answer = real_sync(self, step)
        print(f"POD_STEP step={step} preemption_sync={time.perf_counter() - started:.4f}s")
        return answer

    metrics.MetricBuffer.add = add
    preemption.PreemptionWatcher.reached_sync_point = reached_sync_point


def summarize(trace_dir: str, top: int = 8) -> None:
    """Prints the traced step's XLA ops: seconds per device thread, collectives by name."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF ships the XSpace proto

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(path).read_bytes())
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if "XLAEigen" not in line.name or not line.events:
                continue
            totals = collections.Counter()
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if name.startswith("ThunkExecutor"):
                    continue
                key = name if name.startswith(COLLECTIVES) else "compute (all other ops)"
                totals[key] += event.duration_ps / 1e12
            start = min(e.offset_ps for e in line.events)
            end = max(e.offset_ps + e.duration_ps for e in line.events)
            collective = sum(v for k, v in totals.items() if k.startswith(COLLECTIVES))
            print(
                f"device thread {line.name[-6:]}: step span {(end - start) / 1e12:.2f} s, "
                f"collectives {collective:.2f} s, compute {totals['compute (all other ops)']:.2f} s"
            )
            for name, seconds in totals.most_common(top):
                print(f"    {seconds:8.3f} s  {name}")


def main() -> int:
    """Runs the pod with the timers (worker mode) or launches it and prints the breakdown."""
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--socket_buffer_bytes", type=int, default=4 << 20)
    parser.add_argument("--trace_step", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/pod_step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    trace_dir = f"{args.workdir}/trace"
    if args.worker:
        sys.path.insert(0, str(REPO))
        from absl import app

        from launch import loopback
        from simclr_jax import main as cli

        instrument(args.trace_step, trace_dir)
        if args.socket_buffer_bytes > 0:
            loopback.start_loopback_socket_tuner(args.socket_buffer_bytes)
        sys.argv = ["simclr_jax.main", *extra]
        app.run(cli.main)
        return 0
    sys.path.insert(0, str(REPO / "launch"))
    import simulate_pod

    flags = [
        "--config.train_steps=" + str(args.trace_step + 1),
        "--config.warmup_steps=1",
        "--config.log_every_steps=1",
        "--config.knn_eval=False",
        "--config.data.eval_split=test[:2]",
        *extra,
    ]
    sim = argparse.Namespace(
        python=sys.executable, config="configs/smoke.py:pretrain", workdir=args.workdir,
        port=simulate_pod.free_port(), num_processes=args.num_processes,
        devices_per_process=args.devices_per_process, timeout_s=300,
        socket_buffer_bytes=args.socket_buffer_bytes,
    )  # fmt: skip
    commands = [  # simulate_pod's processes, started through this script's worker mode
        (env, [sys.executable, __file__, "--worker", *own, "--", *cmd[cmd.index("--") + 1 :]])
        for env, cmd in simulate_pod.process_commands(sim, flags)
    ]
    subprocess.run(["rm", "-rf", args.workdir], check=True)
    code = simulate_pod.run(commands, Path(args.workdir) / "logs")
    log = (Path(args.workdir) / "logs" / "process0.log").read_text()
    print("\n".join(line for line in log.splitlines() if line.startswith("POD_STEP")))
    summarize(trace_dir)
    return code


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
