"""Helpers every benchmark and the chaos harness share: free ports, waiting for a child to
listen or speak, stopping it, its CPU time from /proc, percentiles, a UCX environment.

Nothing here measures anything by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

STOP_TIMEOUT_S = 5.0
"""How long a child gets after SIGTERM before SIGKILL."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (held together while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ucx_env(transport: str) -> dict[str, str]:
    """This environment for a NIXL process on loopback (unless UCX_NET_DEVICES says otherwise);
    ``transport`` "tcp" forces UCX's tcp transport, anything else lets UCX choose."""
    env = dict(os.environ)
    env.setdefault("UCX_NET_DEVICES", "lo")
    env.pop("UCX_TLS", None)
    if transport == "tcp":
        env["UCX_TLS"] = "tcp"
    return env


def wait_for_tcp(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Returns once 127.0.0.1:port accepts a connection; raises if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


def read_json_line(process: subprocess.Popen, timeout_s: float) -> dict:
    """One JSON line from a child's stdout, bounded in time."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    fd = process.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"{process.args!r} closed stdout (rc={process.poll()})")
            buffer += chunk
            if b"\n" in buffer:
                return json.loads(buffer.split(b"\n", 1)[0])
        elif process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
    raise TimeoutError(f"{process.args!r} gave no ready line within {timeout_s} s")


def stop_process(process: subprocess.Popen | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after a bound; always reaps."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)


def _task_dirs(pid: int) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        yield from Path(f"/proc/{pid}/task").iterdir()


def cpu_ns(pids: Sequence[int]) -> tuple[int, int]:
    """CPU time of the processes: (schedstat ns over all threads, stat utime+stime in ns)."""
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    sched = 0
    ticks = 0
    for pid in pids:
        for task in _task_dirs(pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                sched += int((task / "schedstat").read_text().split()[0])
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return sched, ticks * tick_ns


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The value at quantile ``q`` of already sorted values (nearest rank); NaN if none."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]
