"""Bad multi-process start-up ends with a clear error within a bounded time, never a hang;
and the simulated pod's loopback socket tuning (launch/loopback.py).

Each case starts `parallel.initialize_distributed` in fresh processes (a process can join only
one distributed run) with a 3-5 s timeout instead of the default 300 s."""

import os
import socket
import subprocess
import sys
import time

import pytest
from pod_worker import REPO, free_port

from launch import loopback

SCRIPT = """
import sys
from simclr_jax import parallel
import logging
logging.basicConfig()
address, count, pid, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
parallel.initialize_distributed(
    address, count, pid, timeout_seconds=timeout, heartbeat_timeout_seconds=timeout
)
if len(sys.argv) > 5:  # 'vanish': this host dies after joining; the others wait, or notice
    import os
    import time

    time.sleep(1)
    if pid == 1:
        os._exit(0)
    time.sleep(120)
    print("still waiting", flush=True)
"""
BOUND_S = 90  # generous for 2 busy CPU cores; without timeouts these cases hang forever


def start(address, count, pid, timeout, *extra):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, address, str(count), str(pid), str(timeout), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc):
    """(exit code, output); the process is killed and the test fails if it outlives BOUND_S."""
    try:
        out, _ = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"no error within {BOUND_S} s: {proc.communicate()[0][-2000:]}")
    return proc.returncode, out


def test_coordinator_that_never_answers():
    started = time.monotonic()
    code, out = finish(start(f"127.0.0.1:{free_port()}", 2, 1, 3))
    assert code != 0
    assert "TimeoutError: no coordinator answered at 127.0.0.1:" in out, out[-2000:]
    assert "Start process 0 (--process_id=0)" in out
    assert time.monotonic() - started < BOUND_S


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:notaport", ":1234"])
def test_malformed_coordinator_address_is_rejected_up_front(address):
    code, out = finish(start(address, 2, 1, 3))
    assert code != 0 and "must be host:port" in out, out[-2000:]


def test_process_id_out_of_range():
    code, out = finish(start("127.0.0.1:1234", 2, 2, 3))
    assert code != 0 and "process_id=2 is out of range for num_processes=2" in out, out[-2000:]


def test_mismatched_process_counts_abort_both_with_an_explanation():
    """Process 0 expects 2 processes, the other claims to be process 2 of 3: the coordinator
    rejects it at once and process 0 gives up after its timeout. Both exit non-zero (JAX
    aborts) after logging which flags to compare."""
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    first = start(address, 2, 0, 5)
    time.sleep(1)  # the coordinator (process 0) listens first, as on a pod
    second = start(address, 3, 2, 5)
    (code0, out0), (code2, out2) = finish(first), finish(second)
    assert code0 != 0 and code2 != 0
    assert "Unexpected task registered with task=2" in out2, out2[-2000:]
    assert "DEADLINE_EXCEEDED" in out0, out0[-2000:]
    for out in (out0, out2):
        assert "a different --num_processes / --coordinator_address" in out
    assert time.monotonic() - started < BOUND_S


def test_a_host_that_never_comes_back_stops_the_others():
    """Process 1 joins, then vanishes (as a preempted host that is not replaced): process 0,
    instead of waiting forever, aborts once the heartbeat timeout (5 s here) has passed."""
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    survivor = start(address, 2, 0, 5, "vanish")
    time.sleep(1)
    vanished = start(address, 2, 1, 5, "vanish")
    (code0, out0), (code1, _) = finish(survivor), finish(vanished)
    assert code1 == 0
    assert code0 != 0 and "still waiting" not in out0
    assert "another task died" in out0, out0[-2000:]
    assert time.monotonic() - started < BOUND_S


# ------------------------------------------------------------------ simulated-pod sockets


def loopback_pair():
    """A listening socket and a connected (client, server) TCP pair on 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return listener, client, server


def wmem_max():
    """The kernel's cap on SO_SNDBUF for unprivileged processes."""
    with open("/proc/sys/net/core/wmem_max") as f:
        return int(f.read())


def sndbuf(sock):
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux /proc only")
def test_loopback_socket_buffers_are_raised_once_per_socket():
    """What launch/simulate_pod.py does to gloo's sockets: connected loopback TCP sockets
    get the requested buffers (capped by net.core.wmem_max), listening ones are left alone."""
    wanted = 1 << 20
    cap = wmem_max()
    listener, client, server = loopback_pair()
    with listener, client, server:
        before = {s: sndbuf(s) for s in (listener, client, server)}
        done = {}
        assert loopback.tune_loopback_sockets(wanted, done) >= 2  # pytest may hold others
        for sock in (client, server):  # exactly as set: Linux doubles the value asked for
            assert sndbuf(sock) == 2 * min(wanted, cap), (before, sndbuf(sock))
            rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert rcvbuf >= min(wanted, cap), rcvbuf
        assert sndbuf(listener) == before[listener]
        assert loopback.tune_loopback_sockets(wanted, done) == 0  # each socket once...
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert loopback.tune_loopback_sockets(wanted, done) == 1  # ...unless it shrank
        assert sndbuf(client) == 2 * min(wanted, cap)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux /proc only")
def test_socket_tuner_catches_sockets_opened_later():
    """gloo connects at the first collective of each device group: the background tuner
    must reach sockets opened after it started."""
    stop = loopback.start_loopback_socket_tuner(1 << 20, interval_s=0.05)
    try:
        listener, client, server = loopback_pair()
        with listener, client, server:
            expected = 2 * min(1 << 20, wmem_max())  # Linux reports twice what was set
            deadline = time.monotonic() + 10
            while sndbuf(client) != expected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sndbuf(client) == expected
    finally:
        stop.set()
