"""Loopback socket tuning for pods simulated on one machine (launch/simulate_pod.py, its
benchmark benchmarks/pod_step.py and the tests): gloo's CPU collectives keep small kernel
buffers on their loopback TCP sockets, which makes large all-reduces crawl. Never needed on a
real pod, so it lives here, outside the library. Stdlib only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import threading


def _is_loopback_tcp(sock: socket.socket) -> bool:
    """True for a connected TCP socket whose peer is this machine (127.0.0.0/8, ::1)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    try:
        host = sock.getpeername()[0]
    except OSError:  # listening or not connected
        return False
    return ipaddress.ip_address(host.split("%")[0]).is_loopback


def tune_loopback_sockets(buffer_bytes: int, done: dict[int, int] | None = None) -> int:
    """Sets SO_SNDBUF / SO_RCVBUF to buffer_bytes on every loopback TCP socket this process
    holds, except those in `done` (socket inode -> send buffer it was left with) that still
    have that buffer; records what it set there. Returns how many it set (0 where
    /proc/self/fd does not exist: not Linux).

    Only for pods simulated on one machine (launch/simulate_pod.py, the tests): gloo's CPU
    collectives keep small kernel buffers, and with loopback's 64 KiB segments a 44 MB
    gradient all-reduce then crawls one segment per delayed ACK (~40 ms). TPU interconnects
    (ICI/DCN) never go through these sockets."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    done = {} if done is None else done
    changed = 0
    for fd in fds:
        try:
            info = os.fstat(fd)
            if not stat.S_ISSOCK(info.st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))  # the dup is closed, never the original
        except OSError:
            continue
        with sock:
            try:
                if not _is_loopback_tcp(sock):
                    continue
                if done.get(info.st_ino) == sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
                    continue
                # The kernel caps the request at net.core.wmem_max / rmem_max (no root
                # needed); it may also shrink a send buffer later, hence the re-check above.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
                done[info.st_ino] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            except OSError:
                continue
        changed += 1
    return changed


def start_loopback_socket_tuner(buffer_bytes: int, interval_s: float = 1.0) -> threading.Event:
    """Runs tune_loopback_sockets every interval_s in a daemon thread (gloo opens its sockets
    lazily, at the first collective of each device group); set the returned event to stop."""
    stop, done = threading.Event(), {}

    def loop() -> None:
        while not stop.wait(interval_s):
            changed = tune_loopback_sockets(buffer_bytes, done)
            if changed:
                logging.info(
                    "Simulated pod: %d loopback sockets set to %d-byte buffers.",
                    changed,
                    buffer_bytes,
                )

    threading.Thread(target=loop, name="loopback-socket-tuner", daemon=True).start()
    return stop
