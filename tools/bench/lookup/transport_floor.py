"""The transport floor under a lookup: one lookup-sized frame echoed over ZMQ and over plain TCP.

What a lookup round trip costs before any lookup logic runs. A child process echoes frames
back, over a ZMQ ROUTER (what the data port is) or a plain TCP socket (what the lookup port
is, `meshkv.dataplane.stream`); this process sends a real `Lookup` frame of ``--keys`` keys
and waits for the echo, one at a time. CPU per round trip is each process's own (all its
threads: ZMQ's I/O thread included), from `resource.getrusage`, so client + server is what
the round trip costs the machine; medians of ``--repeats`` interleaved blocks.

    python -m tools.bench.lookup.transport_floor --out bench-results/transport_floor.json
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import zmq

from tools.bench.common import free_port

CHILD_START_TIMEOUT_S = 30.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _frame(keys: int) -> bytes:
    from meshkv.dataplane import messages as m
    from meshkv.dataplane.stream import stream_frame

    lookup = m.Lookup(req=1, epoch=1, keys=[bytes([i % 256]) * 16 for i in range(keys)])
    return stream_frame(m.encode(m.make_codec(1 << 20), lookup))


def serve(kind: str, port: int, count: int) -> None:
    """(Child) echoes ``count`` frames, then prints its CPU seconds for all but the first."""
    if kind == "zmq":
        router = zmq.Context().socket(zmq.ROUTER)
        router.bind(f"tcp://127.0.0.1:{port}")
        print("ready", flush=True)
        router.send_multipart(router.recv_multipart())
        cpu0 = _cpu_s()
        for _ in range(count - 1):
            router.send_multipart(router.recv_multipart())
    else:
        listener = socket.create_server(("127.0.0.1", port))
        print("ready", flush=True)
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(conn.recv(1 << 16))
        cpu0 = _cpu_s()
        for _ in range(count - 1):
            conn.sendall(conn.recv(1 << 16))
    print(_cpu_s() - cpu0, flush=True)


def block(kind: str, frame: bytes, count: int) -> dict:
    """One block of ``count`` round trips; µs per round trip (wall, client CPU, server CPU)."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "tools.bench.lookup.transport_floor", "--serve", kind,
         "--port", str(port), "--count", str(count)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} echo server did not start")
        if kind == "zmq":
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{port}")

            def round_trip() -> None:
                dealer.send(frame)
                dealer.recv()
        else:
            conn = socket.create_connection(("127.0.0.1", port), CHILD_START_TIMEOUT_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def round_trip() -> None:
                conn.sendall(frame)
                got = 0
                while got < len(frame):
                    got += len(conn.recv(1 << 16))

        round_trip()  # connects
        cpu0, t0 = _cpu_s(), time.perf_counter()
        for _ in range(count - 1):
            round_trip()
        wall_s, client_s = time.perf_counter() - t0, _cpu_s() - cpu0
        server_s = float(child.stdout.readline())
        (dealer if kind == "zmq" else conn).close()
    finally:
        child.wait(CHILD_START_TIMEOUT_S)
    per = 1e6 / (count - 1)
    return {
        "wall_us": wall_s * per,
        "client_cpu_us": client_s * per,
        "server_cpu_us": server_s * per,
        "cpu_us_client_plus_server": (client_s + server_s) * per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=32)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/transport_floor.json"))
    parser.add_argument("--serve", choices=["zmq", "tcp"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.count)
        return
    frame = _frame(args.keys)
    blocks: dict[str, list[dict]] = {"zmq": [], "tcp": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for kind in blocks:
            blocks[kind].append(block(kind, frame, args.count))
    summary = {
        kind: {key: statistics.median(b[key] for b in runs) for key in runs[0]}
        for kind, runs in blocks.items()
    }
    summary["tcp_over_zmq_cpu"] = (
        summary["tcp"]["cpu_us_client_plus_server"] / summary["zmq"]["cpu_us_client_plus_server"]
    )
    report = {"frame_bytes": len(frame), "keys": args.keys, "count": args.count,
              "summary": summary, "blocks": blocks}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
