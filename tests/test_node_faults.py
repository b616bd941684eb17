"""Data-plane faults with a real holder process: kill -9, SIGSTOP, restart, and bad input.

The holder is a `meshkv join --capacity` process (a storage-only member). A producer node in
this process puts chunks and leaves gracefully, handing every chunk to the holder; a reader
node then gets them while the holder is killed or frozen. Whatever happens, a get returns the
leading chunks that arrived intact (or none) within its deadline, never raises, never returns
wrong bytes, and later gets work once a holder is back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from meshkv.dataplane import messages as m
from meshkv.node import MeshNode
from meshkv.wire import MAGIC
from tests.conftest import free_port, wait_until
from tests.test_node import NAMESPACE, chunk, keys_for, make_config

pytestmark = pytest.mark.processes
CHUNK_BYTES = 4 << 20  # 4 MiB
CHUNKS = 24  # 96 MiB: long enough a transfer to be in flight when the holder dies
GET_TIMEOUT_S = 3.0
SLACK_S = 1.0  # thread scheduling on a loaded 2-core machine, not a protocol allowance
LANDED_POLL_S = 0.001  # how often to look for a get's first chunk: the fault must beat its last


class Holder:
    """A `meshkv join --capacity` process on fixed ports (so a restart comes back the same)."""

    def __init__(
        self, tmp: Path, channel: str, *, member_id: str = "holder", extra_yaml: str = ""
    ) -> None:
        self.member_id = member_id
        self.gossip_port, self.data_port = free_port(), free_port()
        self.config = tmp / f"{member_id}.yaml"
        self.config.write_text(
            f"transfer_channel: {channel}\np2p_host: 127.0.0.1\nmesh_gossip_profile: test\n"
            + extra_yaml
        )
        self.out = tmp / f"{member_id}.out"  # its stdout, every boot
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    @property
    def name(self) -> str:
        """Its member name on the ring."""
        return f"{self.member_id}/0"

    def start(self) -> None:
        env = {**os.environ, "UCX_NET_DEVICES": "lo"}
        with self.out.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshkv", "join", "--config", str(self.config),
                 "--id", self.member_id, "--port", str(self.gossip_port),
                 "--data-port", str(self.data_port), "--capacity", "0.25"],
                env=env, stdout=out, stderr=subprocess.DEVNULL,
            )  # fmt: skip

    def signal(self, sig: int) -> None:
        """Sends ``sig``; a SIGSTOP returns once every thread of the holder has stopped (the
        kernel stops them asynchronously: a thread still running may answer one more request)."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            wait_until("every thread of the holder stopped", self._all_stopped, 10)

    def _all_stopped(self) -> bool:
        assert self.proc is not None
        tasks = Path(f"/proc/{self.proc.pid}/task")
        states = []
        for task in tasks.iterdir():
            stat = (task / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])  # the field after "(comm)"
        return all(state in "tT" for state in states)

    def leave(self) -> dict[str, int]:
        """Stops the holder with SIGTERM (it leaves the mesh); returns the counters it printed
        on its way out."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        self.proc.wait(30)
        last = [line for line in self.out.read_text().splitlines() if line.startswith("stats ")]
        return json.loads(last[-1].removeprefix("stats "))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(params=["tcp", pytest.param("nixl", marks=pytest.mark.nixl)])
def channel(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def holder(tmp_path: Path, channel: str) -> Iterator[Holder]:
    holder = Holder(tmp_path, channel)
    holder.start()
    try:
        yield holder
    finally:
        holder.signal(signal.SIGCONT) if holder.proc and holder.proc.poll() is None else None
        holder.stop()


def node(name: str, channel: str, holder: Holder) -> MeshNode:
    config = make_config(
        channel, [holder.address], lmcache_instance_id=name, max_local_cpu_size=0.25
    )
    member = MeshNode(config, namespace=NAMESPACE)
    member.start()
    wait_until("the holder alive at the member", lambda: member.membership.is_alive("holder/0"), 30)
    return member


def hand_chunks_to(holder: Holder, channel: str, count: int = CHUNKS) -> list[bytes]:
    """Puts chunks from a producer that then leaves, so only the holder has them."""
    producer = node("producer", channel, holder)
    keys = keys_for(count, salt=str(time.monotonic_ns()))
    producer.put(keys, [chunk(k, CHUNK_BYTES) for k in keys])
    wait_until("the producer's pushes done", producer.pusher.idle, 30)
    producer.stop()  # graceful: its chunks go to the holder first
    return keys


def timed_get(
    reader: MeshNode, keys: list[bytes], during: Callable[[], int]
) -> tuple[int, float, int]:
    """Runs a get while ``during`` acts; returns (count, seconds, what ``during`` returned)."""
    result: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            with reader.get(keys, CHUNK_BYTES, timeout_s=GET_TIMEOUT_S) as lease:
                result["count"] = lease.count
                result["intact"] = all(
                    np.array_equal(v, chunk(k, CHUNK_BYTES))
                    for k, v in zip(keys, lease.views, strict=False)
                )
        except Exception as exc:  # the assertion below reports it
            result["error"] = exc
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    seen = during()
    thread.join(GET_TIMEOUT_S + 10)
    assert not thread.is_alive(), "get hung past its deadline"
    assert "error" not in result, f"get raised {result.get('error')!r}"
    assert result["intact"], "a get returned wrong bytes"
    return int(result["count"]), float(result["elapsed"]), seen


def mid_transfer(reader: MeshNode, fault: Callable[[], None]) -> Callable[[], int]:
    """What `timed_get` does during the get: waits until the get's first chunk has landed in
    the reader's store, then runs ``fault`` at once; returns how many had landed by then."""

    def during() -> int:
        landed = wait_until("a first chunk landed", lambda: reader.store.stats().chunks,
                            GET_TIMEOUT_S, poll_s=LANDED_POLL_S)  # fmt: skip
        fault()
        return landed

    return during


def cut_short_mid_transfer(reader: MeshNode, keys: list[bytes], fault: Callable[[], None]) -> None:
    """Gets ``keys`` (none of them here yet) while ``fault`` lands after the first chunk: the
    get must end within its deadline with fewer than all chunks, proof that the fault landed
    during the transfer and cut it short."""
    assert reader.store.stats().chunks == 0
    count, elapsed, landed = timed_get(reader, keys, mid_transfer(reader, fault))
    assert landed < CHUNKS, "the get was over before the fault"
    assert count < CHUNKS, "the fault landed after the transfer, not during it"
    assert elapsed <= GET_TIMEOUT_S + SLACK_S


def full_get(reader: MeshNode, keys: list[bytes]) -> bool:
    """True once a get returns every chunk; never with wrong bytes."""
    with reader.get(keys, CHUNK_BYTES, timeout_s=15) as lease:
        assert all(
            np.array_equal(v, chunk(k, CHUNK_BYTES))
            for k, v in zip(keys, lease.views, strict=False)
        )
        return lease.count == len(keys)


def test_holder_killed_during_a_large_get(holder: Holder, channel: str) -> None:
    keys = hand_chunks_to(holder, channel)
    reader = node("reader", channel, holder)
    try:
        wait_until(
            "the reader finds every chunk", lambda: reader.lookup(keys) == CHUNKS, 30
        )  # pointers must arrive
        cut_short_mid_transfer(reader, keys, lambda: holder.signal(signal.SIGKILL))
        holder.proc.wait(10)
        holder.start()  # the same instance id, a new boot
        wait_until(
            "the restarted holder known", lambda: reader.membership.peer("holder/0") is not None, 30
        )
        again = hand_chunks_to(holder, channel, count=4)
        wait_until("the reader finds the new chunks", lambda: reader.lookup(again) == 4, 10)
        with reader.get(again, CHUNK_BYTES) as lease:
            assert lease.count == 4
    finally:
        reader.stop(leave=False)


def test_holder_frozen_during_a_get_then_resumed(holder: Holder, channel: str) -> None:
    keys = hand_chunks_to(holder, channel)
    reader = node("reader", channel, holder)
    try:
        wait_until("the reader finds every chunk", lambda: reader.lookup(keys) == CHUNKS, 30)
        cut_short_mid_transfer(reader, keys, lambda: holder.signal(signal.SIGSTOP))
        holder.signal(signal.SIGCONT)
        wait_until("the reader finds every chunk", lambda: reader.lookup(keys) == CHUNKS, 40)
        # The frozen get's unanswered slots stay reserved until its deadline + 1 s (a thawed
        # holder may still write into them), so the same keys miss until then, then load.
        wait_until("a full get", lambda: full_get(reader, keys), GET_TIMEOUT_S + 10)
    finally:
        reader.stop(leave=False)


@pytest.mark.nixl
@pytest.mark.parametrize("channel", ["nixl"])
def test_gets_a_frozen_holder_reads_after_the_reader_gave_up_write_nothing(
    holder: Holder, channel: str
) -> None:
    """A holder frozen with gets queued reads them when thawed, long after the reader gave up
    and reused their slots for other chunks. Over NIXL a WRITE lands in the reader's memory
    directly, so the holder must see that those gets expired and refuse them. (Over the tcp
    channel a late reply is only dropped by the reader: nothing to check there.)"""
    keys = hand_chunks_to(holder, channel)
    reader = node("reader", channel, holder)
    try:
        wait_until("the reader finds every chunk", lambda: reader.lookup(keys) == CHUNKS, 30)
        reader.get(keys[:1], CHUNK_BYTES).release()  # the handshake: the holder may write here
        holder.signal(signal.SIGSTOP)
        with reader.get(keys[1:], CHUNK_BYTES, timeout_s=GET_TIMEOUT_S) as lease:
            assert lease.count == 0  # every request queues at the frozen holder
        wait_until(
            "no slot left reserved", lambda: reader.store.stats().reserved == 0, GET_TIMEOUT_S + 5
        )
        fill = keys_for(reader.store.stats().budget_bytes // CHUNK_BYTES, salt="fill")
        assert reader.put(fill, [chunk(k, CHUNK_BYTES) for k in fill]) == len(fill)
        holder.signal(signal.SIGCONT)
        # This thread's requests share one connection, read in order: once the holder answers
        # a lookup, it has handled every get queued before it (a cma WRITE ends in its post).
        wait_until("the reader finds every chunk", lambda: reader.lookup(keys) == CHUNKS, 40)
        with reader.get(fill, CHUNK_BYTES, timeout_s=15) as lease:  # local: checked again
            assert lease.count == len(fill), "a late write corrupted a reused slot"
            assert all(
                np.array_equal(v, chunk(k, CHUNK_BYTES))
                for k, v in zip(fill, lease.views, strict=True)
            )
        assert holder.leave()["data.refused_expired"] >= 1
    finally:
        reader.stop(leave=False)


def test_bad_input_on_the_data_port_is_refused_and_counted(holder: Holder, channel: str) -> None:
    member = node("victim", channel, holder)
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{member.data_address}")
    codec = m.make_codec(1 << 20)
    key = keys_for(1)[0]
    try:
        refusals = [
            m.Put(req=2, epoch=12345, keys=[key], chunk_bytes=64),  # stale epoch
            m.Commit(req=3, keys=[key], checksums=[b"x" * 16]),  # nothing reserved
            m.Get(
                req=4,
                epoch=0,
                sender="nobody/0",
                keys=[key],
                dest=[],
                budget_ms=100,
                sent_ms=m.wall_clock_ms(),
            ),
        ]
        for request in refusals:
            sock.send(m.encode(codec, request))
        replies = [m.decode(codec, sock.recv()) for _ in refusals if sock.poll(10_000)]
        kinds = [type(r).__name__ for r in replies]
        if channel == "nixl":  # a get needs the sender's handshake (whose slots to write)
            assert kinds == ["Error", "CommitReply", "Error"]
            assert replies[2].reason == "no_handshake"
        else:  # tcp: the bytes go in the reply; nothing held is a miss
            assert kinds == ["Error", "CommitReply", "GetReply"]
            assert replies[2].checksums == []
        assert replies[1].stored == 0
        assert member.server.stats["refused_stale_epoch"] == 1
        bad_frames = [
            os.urandom(64),  # garbage
            MAGIC,  # truncated
            MAGIC + bytes([2, 9, 0]) + msgpack.packb([3, {}]),  # wrong protocol version
            m.encode(codec, m.Lookup(req=1, epoch=0, keys=[key]))[:-3],  # cut short
            codec.encode(3, {"req": 1, "epoch": 0, "keys": key + b"short"}),  # bad key length
            codec.encode(99, {"req": 1}),  # unknown type
            b"\0" * (300 << 20),  # oversized: ZMQ drops the connection
        ]
        for frame in bad_frames:
            sock.send(frame)
        wait_until(
            "six frames dropped",
            lambda: sum(v for k, v in member.server.stats.items() if "drop" in k) >= 6,
        )
        # the member keeps serving: a real put and lookup still work
        member.put([key], [chunk(key, 4096)])
        assert member.lookup([key]) == 1
        assert member.store.stats().reserved == 0, "no slot may leak"
        assert member.gossip.running
    finally:
        sock.close(linger=0)
        member.stop(leave=False)
