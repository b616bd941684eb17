"""Where a member's CPU goes when it answers a lookup: its service core alone, no sockets.

A real `DataService` over a real store, directory and chain index (tcp byte path) answers
lookup frames as its driver does: decode the frame, `handle` it, encode the reply. Measured per
lookup with the process CPU clock, each phase on its own and the three together (medians of
``--repeats`` runs of ``--lookups``), then a cProfile of the slowest case: the functions that
take the time. The socket loop around it (`meshkv.dataplane.server`) is measured by the
benchmark proper (schedstat of the member processes).

    python -m tools.bench.lookup.member_path --out bench-results/member_path.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from meshkv.dataplane import messages as m
from meshkv.dataplane.byte_path import InlineBytes
from meshkv.dataplane.directory import HolderDirectory
from meshkv.dataplane.service import DataService
from meshkv.ring.view import RingView
from meshkv.store import ChunkStore, chunk_checksum
from meshkv.transfer import TcpChannel

ME = "me/0"
CHUNK_BYTES = 64


def build() -> tuple[DataService, ChunkStore, HolderDirectory, RingView, InlineBytes]:
    store = ChunkStore.with_budget(64 << 20, segment_bytes=8 << 20)
    directory = HolderDirectory()
    ring = RingView([ME, "other/0", "third/0"], vnodes=256)
    path = InlineBytes(TcpChannel(), store.pool, reply_max_bytes=1 << 20)
    service = DataService(
        name=ME, nonce=1, store=store, path=path,
        directory=directory, ring=lambda: ring, holder_alive=lambda name: True,
    )  # fmt: skip
    return service, store, directory, ring, path


def hold(store: ChunkStore, count: int) -> list[bytes]:
    keys = [secrets.token_bytes(16) for _ in range(count)]
    for key in keys:
        slot = store.reserve(key, CHUNK_BYTES, owner="bench", deadline_s=1e18)
        view = store.view(slot)  # type: ignore[arg-type]
        view[:] = 0
        store.commit(key, chunk_checksum(view), owner="bench")
    return keys


def cases(store: ChunkStore, directory: HolderDirectory) -> dict[str, list[bytes]]:
    """32 keys all held; 128 with 16 held and 112 named by the chain index (in 7 runs) or by
    per-key held-at pointers; 32 keys nobody knows."""
    chained = hold(store, 16) + [secrets.token_bytes(16) for _ in range(112)]
    directory.chains.record(chained[0], 0, chained[:16], ME)
    for run in range(7):
        start = 16 + 16 * run
        directory.chains.record(chained[0], start, chained[start : start + 16], f"h{run}/0")
    pointed = hold(store, 16) + [secrets.token_bytes(16) for _ in range(112)]
    directory.record(pointed[16:], "other/0")
    return {
        "32 held": hold(store, 32),
        "128: 16 held + 112 from the chain index": chained,
        "128: 16 held + 112 from held-at pointers": pointed,
        "32 unknown": [secrets.token_bytes(16) for _ in range(32)],
    }


def per_lookup_us(work: Callable[[], object], lookups: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.process_time_ns()
        for _ in range(lookups):
            work()
        runs.append((time.process_time_ns() - t0) / lookups / 1e3)
    return statistics.median(runs)


def measure(lookups: int, repeats: int) -> dict:
    service, store, directory, ring, _ = build()
    codec = m.make_codec(1 << 20)
    out: dict = {"cases": {}}
    for name, keys in cases(store, directory).items():
        frame = m.encode(codec, m.Lookup(req=1, epoch=ring.epoch, keys=keys))
        request = m.decode(codec, frame)
        reply = service.handle(b"peer", request, 0.0, wall_ms=0).replies[0].message

        def whole(frame: bytes = frame) -> None:
            step = service.handle(b"peer", m.decode(codec, frame), 0.0, wall_ms=0)
            m.encode_frames(codec, step.replies[0].message)

        assert isinstance(reply, m.LookupReply)
        out["cases"][name] = {
            "answered_keys": reply.held + sum(reply.runs),
            "decode_us": per_lookup_us(lambda f=frame: m.decode(codec, f), lookups, repeats),
            "handle_us": per_lookup_us(
                lambda r=request: service.handle(b"peer", r, 0.0, wall_ms=0), lookups, repeats
            ),
            "encode_us": per_lookup_us(lambda r=reply: m.encode_frames(codec, r), lookups, repeats),
            "total_us": per_lookup_us(whole, lookups, repeats),
        }
    slowest = max(out["cases"], key=lambda c: out["cases"][c]["total_us"])
    keys = cases(store, directory)[slowest]
    frame = m.encode(codec, m.Lookup(req=1, epoch=ring.epoch, keys=keys))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(lookups):
        step = service.handle(b"peer", m.decode(codec, frame), 0.0, wall_ms=0)
        m.encode_frames(codec, step.replies[0].message)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(10)
    out["profile_case"] = slowest
    out["profile"] = text.getvalue()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-results/member_path.json"))
    args = parser.parse_args()
    result = measure(args.lookups, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, row in result["cases"].items():
        print(
            f"{name:<42} total {row['total_us']:6.1f} us  decode {row['decode_us']:5.1f}"
            f"  handle {row['handle_us']:5.1f}  encode {row['encode_us']:5.1f}"
            f"  ({row['answered_keys']} keys answered)"
        )
    print(f"\nprofile of {result['profile_case']!r}:\n{result['profile']}")


if __name__ == "__main__":
    main()
