"""Where an asker's CPU goes in one remote lookup, layer by layer, on real members.

N members (`MeshkvPath`: the asker in this process); lookups of ``--chunks``-chunk prompts
whose first home is one other member, one at a time, measured four ways on the same prompts:

- ``raw``: the lookup's frame sent on a plain blocking TCP socket to that member's lookup port,
  its reply read (pre-encoded frames: the transport and the member, no client code);
- ``raw+codec``: the same, encoding each `Lookup` and decoding each reply here;
- ``call``: `RequestClient.call` of the `Lookup` (stream link, request bookkeeping, poll);
- ``lookup``: `MeshNode.lookup` (`meshkv.node.locate`: the ring, the local store, the ask).

Per lookup: this thread's CPU (``time.thread_time``) and wall time, medians of ``--repeats``
interleaved blocks of ``--lookups``. Each layer's CPU minus the one below it is what that
layer costs on this host, where every step after a wait runs with cold caches (a warm loop of
the codec alone costs ~4x less: `member_path`).

    python -m tools.bench.lookup.asker_layers --members 2 --out bench-results/asker_layers.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from tools.bench.lookup.meshkv_path import MeshkvPath
from tools.bench.lookup.settings import LOOKUP_DEADLINE_S
from tools.bench.lookup.workload import make_holdings

WARM_LOOKUPS = 100


def per_lookup(work: Callable[[int], object], lookups: int) -> tuple[float, float]:
    """(this thread's CPU, wall) in µs per call of ``work``."""
    cpu0, wall0 = time.thread_time_ns(), time.perf_counter_ns()
    for i in range(lookups):
        work(i)
    return (
        (time.thread_time_ns() - cpu0) / lookups / 1e3,
        (time.perf_counter_ns() - wall0) / lookups / 1e3,
    )


def measure(args: argparse.Namespace, log_dir: Path) -> dict:
    from meshkv.dataplane import messages as m
    from meshkv.dataplane.stream import stream_frame

    path = MeshkvPath(zmq.Context(), log_dir, use_shim=False)
    holdings = make_holdings(args.members, args.keys, args.seed)
    try:
        setup = path.setup(holdings)
        node = path.asker
        ring = node.membership.ring()
        remote = [
            p
            for p in path.cases(holdings, args.chunks, args.seed)["hit_first"]
            if path.servers_asked(p) == 1
        ]
        if not remote:
            raise RuntimeError("no prompt of this size is homed at another member")
        target = ring.current.home(remote[0].keys[0])
        prompts = [list(p.keys) for p in remote if ring.current.home(p.keys[0]) == target]
        peer = node.membership.peer(target)
        client = node._client()  # the asker thread's own client: what MeshNode.lookup uses
        codec = client._codec
        address = client.route(peer.lookup_address, peer.data_address)
        host, _, port = peer.lookup_address.rpartition(":")
        raw = socket.create_connection((host, int(port)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        epoch = ring.epoch

        def lookup_frame(i: int) -> bytes:
            message = m.Lookup(req=i + 1, epoch=epoch, keys=prompts[i % len(prompts)])
            return stream_frame(m.encode(codec, message))

        frames = [lookup_frame(i) for i in range(len(prompts))]

        def raw_round_trip(i: int) -> None:
            raw.sendall(frames[i % len(frames)])
            raw.recv(1 << 16)  # one reply: a few hundred bytes, one read

        def raw_with_codec(i: int) -> None:
            raw.sendall(lookup_frame(i))
            m.decode(codec, raw.recv(1 << 16)[4:])

        def call(i: int) -> None:
            lookup = m.Lookup(req=client.next_id(), epoch=epoch, keys=prompts[i % len(prompts)])
            client.call(address, lookup, time.monotonic() + LOOKUP_DEADLINE_S)

        def lookup(i: int) -> None:
            node.lookup(prompts[i % len(prompts)], timeout_s=LOOKUP_DEADLINE_S)

        layers = {"raw": raw_round_trip, "raw+codec": raw_with_codec, "call": call,
                  "lookup": lookup}  # fmt: skip
        blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
        for work in layers.values():
            per_lookup(work, WARM_LOOKUPS)
        for _ in range(args.repeats):  # interleaved: drift hits every layer alike
            for name, work in layers.items():
                blocks[name].append(per_lookup(work, args.lookups))
        raw.close()
    finally:
        path.teardown()
    summary = {
        name: {
            "cpu_us": statistics.median(b[0] for b in runs),
            "wall_us": statistics.median(b[1] for b in runs),
        }
        for name, runs in blocks.items()
    }
    return {"members": args.members, "chunks": args.chunks, "target": target, "setup": setup,
            "summary": summary, "blocks": blocks}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--keys", type=int, default=400, help="chunks per member")
    parser.add_argument("--lookups", type=int, default=2000, help="lookups per block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-results/asker_layers.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / "asker_layers-logs"
    log_dir.mkdir(exist_ok=True)
    result = measure(args, log_dir)
    args.out.write_text(json.dumps(result, indent=1))
    below = 0.0
    for name, row in result["summary"].items():
        print(f"{name:<10} cpu {row['cpu_us']:6.1f} us (+{row['cpu_us'] - below:5.1f})"
              f"  wall {row['wall_us']:6.1f} us")  # fmt: skip
        below = row["cpu_us"]


if __name__ == "__main__":
    main()
