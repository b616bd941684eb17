"""CPU per lookup of the data plane's socket loops alone: one `DataServer`, one client.

A child process runs a real `DataServer` over a `DataService` holding 32-chunk prompts (the
`member_path` store, tcp byte path, no gossip); this process asks it lookups through a
`RequestClient` (one at a time) and a `RequestLoop` (``--in-flight`` at a time). Per lookup,
from /proc schedstat: the server's data thread, its ZMQ I/O thread, and this process's threads;
medians of ``--repeats`` blocks. Run it on each side of a change to compare (same host, same
moment: interleave the two).

    python -m tools.bench.lookup.driver_loop --lookups 2000 --out bench-results/driver_loop.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

from tools.bench.lookup.member_cpu import thread_cpu_ns

DEADLINE_S = 2.0
WARM_LOOKUPS = 200


def serve() -> None:
    """(Child) a DataServer on any free port; its address and data thread on stdout; stops
    when stdin closes."""
    from meshkv.dataplane import messages as m
    from meshkv.dataplane.config import DataPlaneConfig
    from meshkv.dataplane.server import DataServer, bind_router
    from tools.bench.lookup.member_path import build, cases

    service, store, directory, ring, path = build()
    keys = cases(store, directory)["32 held"]
    context = zmq.Context()
    codec = m.make_codec(1 << 20)
    config = DataPlaneConfig()
    router, port = bind_router(context, "127.0.0.1", 0, codec=codec, config=config)
    server = DataServer(context=context, router=router, codec=codec, service=service,
                        path=path, config=config)  # fmt: skip
    server.start()
    data_tid = next(t.native_id for t in threading.enumerate() if t.name == "meshkv-data")
    ready = {"port": port, "epoch": ring.epoch, "keys": [k.hex() for k in keys], "tid": data_tid}
    print(json.dumps(ready), flush=True)
    sys.stdin.read()
    server.stop()


def ask(args: argparse.Namespace) -> dict:
    from meshkv.dataplane import messages as m
    from meshkv.dataplane.client import RequestClient, RequestLoop

    child = subprocess.Popen(
        [sys.executable, "-m", "tools.bench.lookup.driver_loop", "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = json.loads(child.stdout.readline())
        address, epoch = f"127.0.0.1:{ready['port']}", ready["epoch"]
        keys = [bytes.fromhex(k) for k in ready["keys"]]
        codec = m.make_codec(1 << 20)
        context = zmq.Context()
        client = RequestClient(context, codec)
        loop = RequestLoop(context, codec, name="request-loop")

        def one_at_a_time(count: int) -> None:
            for _ in range(count):
                lookup = m.Lookup(req=client.next_id(), epoch=epoch, keys=keys)
                reply = client.call(address, lookup, time.monotonic() + DEADLINE_S)
                if not isinstance(reply, m.LookupReply) or reply.held != len(keys):
                    raise RuntimeError(f"wrong or no reply: {reply!r}")

        def in_flight(count: int) -> None:
            lock = threading.Condition()
            state = {"started": 0, "done": 0, "wrong": 0}

            def start() -> None:
                with lock:
                    if state["started"] >= count:
                        return
                    state["started"] += 1
                lookup = m.Lookup(req=loop.next_id(), epoch=epoch, keys=keys)
                loop.submit([(address, lookup)], time.monotonic() + DEADLINE_S, done)

            def done(replies: list) -> None:
                with lock:
                    state["done"] += 1
                    reply = replies[0]
                    state["wrong"] += not isinstance(reply, m.LookupReply) or reply.held != 32
                    lock.notify_all()
                start()

            for _ in range(args.in_flight):
                start()
            with lock:
                lock.wait_for(lambda: state["done"] >= count, timeout=count * DEADLINE_S)
            if state["wrong"] or state["done"] < count:
                raise RuntimeError(f"in flight: {state}")

        data_tid = ready["tid"]
        out: dict = {"in_flight": args.in_flight, "lookups_per_block": args.lookups}
        for mode, run in (("one_at_a_time", one_at_a_time), ("in_flight", in_flight)):
            run(WARM_LOOKUPS)
            blocks = []
            for _ in range(args.repeats):
                server0, client0 = (
                    _server_threads(child.pid, data_tid),
                    thread_cpu_ns([os.getpid()]),
                )
                t0 = time.monotonic()
                run(args.lookups)
                wall_s = time.monotonic() - t0
                server1, client1 = (
                    _server_threads(child.pid, data_tid),
                    thread_cpu_ns([os.getpid()]),
                )
                per = 1e3 * args.lookups
                blocks.append({
                    "server_data_thread_us": (server1[0] - server0[0]) / per,
                    "server_zmq_io_us": (server1[1] - server0[1]) / per,
                    "client_us": (sum(client1.values()) - sum(client0.values())) / per,
                    "lookups_per_s": args.lookups / wall_s,
                })  # fmt: skip
            out[mode] = {k: statistics.median(b[k] for b in blocks) for k in blocks[0]}
            out[mode]["blocks"] = blocks
        loop.close()
        client.close()
        return out
    finally:
        child.stdin.close()
        child.wait(10)


def _server_threads(pid: int, data_tid: int) -> tuple[int, int]:
    """CPU ns so far of the server's data thread and of its ZMQ I/O thread."""
    data = io = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = Path(f"/proc/{pid}/task/{tid}")
        ns = int((base / "schedstat").read_text().split()[0])
        if int(tid) == data_tid:
            data = ns
        elif (base / "comm").read_text().strip() == "ZMQbg/IO/0":
            io = ns
    return data, io


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-results/driver_loop.json"))
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    result = ask(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for mode in ("one_at_a_time", "in_flight"):
        row = result[mode]
        print(
            f"{mode:<14} server data thread {row['server_data_thread_us']:6.1f} us"
            f"  server zmq io {row['server_zmq_io_us']:5.1f} us"
            f"  client {row['client_us']:6.1f} us  {row['lookups_per_s']:7.0f} lookups/s"
        )


if __name__ == "__main__":
    main()
