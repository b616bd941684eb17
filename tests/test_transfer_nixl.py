"""The NIXL channel between two real processes over UCX on loopback (cma and tcp transports).

This process holds a store and a `NixlChannel`; each peer is this same file run as a script
(``python tests/test_transfer_nixl.py peer <budget MiB>``): a store and a channel of its own,
driven by JSON lines on stdin/stdout. We WRITE into the peer's reserved slots and compare
checksums; then kill it, freeze it and restart it, and check every write returns by its deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from meshkv.dataplane.messages import SlotRef
from meshkv.errors import ProtocolError, TransportError
from meshkv.store import ChunkStore, Slot, chunk_checksum
from meshkv.transfer import SegmentInfo
from tools.bench.common import ucx_env

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.processes,
]
nixl_channel = pytest.importorskip("meshkv.transfer.nixl_channel", exc_type=ImportError)
NixlChannel = nixl_channel.NixlChannel

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
PEER_SEGMENT_BYTES = 16 * MIB
"""Small segments, so the peer's budget is shared by the chunk sizes the tests use (one store
segment serves one slot size at a time; a 160 MiB budget in default segments is one segment)."""
PEER_START_S = 60.0
REPLY_S = 30.0
SLACK_S = 0.5
"""How far past its deadline a write may return (one post on a busy 2-core machine)."""


class Peer:
    """A member process with its own store and NIXL agent; killed by PID when done."""

    def __init__(self, transport: str, budget_mib: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_transfer_nixl", "peer", str(budget_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ucx_env(transport),
            cwd=REPO,
        )
        hello = self._read(PEER_START_S)
        self.metadata = bytes.fromhex(hello["metadata"])
        self.segments = [
            SegmentInfo(segment=s[0], address=s[1], nbytes=s[2]) for s in hello["segments"]
        ]

    def _read(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"peer {self.proc.pid} did not answer in {timeout_s} s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"peer {self.proc.pid} exited ({self.proc.poll()})")
        return json.loads(line)

    def call(self, op: str, **fields: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(REPLY_S)

    def reserve(self, keys: list[bytes], nbytes: int) -> list[SlotRef]:
        reply = self.call("reserve", keys=[k.hex() for k in keys], nbytes=nbytes)
        return [SlotRef(seg, off) for seg, off in reply["slots"]]

    def checksums(self, keys: list[bytes]) -> list[bytes]:
        return [
            bytes.fromhex(h) for h in self.call("checksums", keys=[k.hex() for k in keys])["sums"]
        ]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class Local:
    """This process's side: a store and a channel created under one UCX transport."""

    def __init__(self, transport: str) -> None:
        saved = os.environ.copy()
        os.environ.clear()
        os.environ.update(ucx_env(transport))
        try:
            self.store = ChunkStore.with_budget(1024 * MIB)
            self.channel = NixlChannel(f"test-{secrets.randbits(64):016x}", self.store.pool)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.transport = transport

    def chunks(self, count: int, nbytes: int, seed: int) -> list[Slot]:
        """Commits ``count`` chunks of random bytes and returns them pinned."""
        rng = np.random.default_rng(seed)
        keys = [secrets.token_bytes(16) for _ in range(count)]
        for key in keys:
            slot = self.store.reserve(key, nbytes, owner="src", deadline_s=float("inf"))
            assert isinstance(slot, Slot)
            self.store.view(slot)[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
            assert self.store.commit(key, self.store.checksum(slot), owner="src") is not None
        slots = self.store.pin(keys, owner="test", deadline_s=float("inf"))
        assert len(slots) == count
        return slots

    def add(self, name: str, peer: Peer) -> None:
        assert self.channel.add_peer(name, peer.metadata, peer.segments)


@pytest.fixture(scope="module", params=["cma", "tcp"])
def local(request: pytest.FixtureRequest) -> Iterator[Local]:
    side = Local(request.param)
    yield side
    side.channel.close()


@pytest.fixture(scope="module")
def shared(local: Local) -> Iterator[Peer]:
    """A peer that every test may write into, added as "shared" (tests use fresh keys)."""
    peer = Peer(local.transport, budget_mib=160)
    local.add("shared", peer)
    yield peer
    local.channel.remove_peer("shared")
    peer.close()


@pytest.fixture
def peers(local: Local) -> Iterator[list[Peer]]:
    """Peers a test starts for itself (to kill, freeze or restart them)."""
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.close()


def start(peers: list[Peer], transport: str, budget_mib: int = 160) -> Peer:
    peer = Peer(transport, budget_mib)
    peers.append(peer)
    return peer


@pytest.mark.parametrize("batch", [1, 64])
def test_batched_write_lands_bytes_intact(local: Local, shared: Peer, batch: int) -> None:
    chunk_bytes = 2 * MIB if batch == 1 else MIB
    src = local.chunks(batch, chunk_bytes, seed=batch)
    keys = [s.key for s in src]
    dest = shared.reserve(keys, chunk_bytes)
    assert local.channel.write("shared", [s.region for s in src], dest, time.monotonic() + 10)
    assert shared.checksums(keys) == [s.checksum for s in src]
    local.store.unpin(src, owner="test")


def test_remote_slots_outside_the_peers_segments_are_refused(local: Local, shared: Peer) -> None:
    [src] = local.chunks(1, MIB, seed=1)
    with pytest.raises(ProtocolError):
        local.channel.post_write("shared", [src.region], [SlotRef(0, 64 * MIB - 4096)])
    with pytest.raises(ProtocolError):
        local.channel.post_write("shared", [src.region], [SlotRef(99, 0)])
    with pytest.raises(TransportError):
        local.channel.post_write("nobody", [src.region], [SlotRef(0, 0)])
    local.store.unpin([src], owner="test")


def test_killed_peer_fails_the_write_before_its_deadline(local: Local, peers: list[Peer]) -> None:
    peer = start(peers, local.transport, budget_mib=300)
    local.add("p", peer)
    src = local.chunks(64, 4 * MIB, seed=2)
    dest = peer.reserve([s.key for s in src], 4 * MIB)
    deadline_window_s = 10.0
    killer = threading.Timer(0.05, peer.signal, args=(signal.SIGKILL,))
    outcomes = []
    killer.start()
    try:
        for _ in range(40):  # 256 MiB per write: the kill lands during one of them
            started = time.monotonic()
            ok = local.channel.write(
                "p", [s.region for s in src], dest, started + deadline_window_s
            )
            outcomes.append((ok, time.monotonic() - started))
            if not ok:
                break
    finally:
        killer.cancel()
    ok, elapsed_s = outcomes[-1]
    assert not ok, "no write failed after the peer was killed"
    assert elapsed_s < deadline_window_s / 2, "the failure was a timeout, not a detected disconnect"
    local.channel.remove_peer("p")
    local.store.unpin(src, owner="test")


def test_frozen_peer_never_holds_a_write_past_its_deadline(
    local: Local, shared: Peer, peers: list[Peer]
) -> None:
    frozen = start(peers, local.transport)
    local.add("frozen", frozen)
    src = local.chunks(16, MIB, seed=3)
    keys = [s.key for s in src]
    to_frozen = frozen.reserve(keys, MIB)
    to_healthy = shared.reserve(keys, MIB)
    frozen.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        ok = local.channel.write("frozen", [s.region for s in src], to_frozen, started + 1.0)
        elapsed_s = time.monotonic() - started
        assert elapsed_s < 1.0 + SLACK_S
        if local.transport == "tcp":
            assert not ok, "a tcp write completed into a stopped process"
        # cma copies with process_vm_writev, which works on a stopped process: ok may be True.
        assert local.channel.write(
            "shared", [s.region for s in src], to_healthy, time.monotonic() + 10
        )
        assert shared.checksums(keys) == [s.checksum for s in src]
    finally:
        frozen.signal(signal.SIGCONT)
    # The failed write reset the connection; the thawed peer is reachable again without a new
    # handshake.
    assert local.channel.write("frozen", [s.region for s in src], to_frozen, time.monotonic() + 10)
    assert frozen.checksums(keys) == [s.checksum for s in src]
    local.store.unpin(src, owner="test")


def test_a_restarted_peer_with_a_new_agent_works(local: Local, peers: list[Peer]) -> None:
    if local.transport != "tcp":
        pytest.skip("independent of the transport: runs once, over tcp")
    first = start(peers, local.transport)
    local.add("p", first)
    src = local.chunks(4, MIB, seed=4)
    keys = [s.key for s in src]
    assert local.channel.write(
        "p", [s.region for s in src], first.reserve(keys, MIB), time.monotonic() + 10
    )
    first.close()
    local.channel.remove_peer("p")
    with pytest.raises(TransportError):
        local.channel.post_write("p", [s.region for s in src], [SlotRef(0, 0)] * 4)
    second = start(peers, local.transport)
    local.add("p", second)
    assert local.channel.write(
        "p", [s.region for s in src], second.reserve(keys, MIB), time.monotonic() + 10
    )
    assert second.checksums(keys) == [s.checksum for s in src]
    local.store.unpin(src, owner="test")


def test_an_idle_agent_does_not_spin_a_core(shared: Peer) -> None:
    peer = shared

    def cpu_s() -> float:
        fields = Path(f"/proc/{peer.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_s()
    time.sleep(2.0)
    assert cpu_s() - before < 0.15, "the peer burned CPU while idle (stock NIXL spins ~0.5-1 s)"


def _peer_main(budget_mib: int) -> None:
    """The peer process: a store and a NIXL channel, driven by JSON lines on stdin."""
    store = ChunkStore.with_budget(budget_mib * MIB, segment_bytes=PEER_SEGMENT_BYTES)
    channel = NixlChannel(f"peer-{secrets.randbits(64):016x}", store.pool)
    segments = [[s.segment, s.address, s.nbytes] for s in channel.segments()]
    print(json.dumps({"metadata": channel.metadata().hex(), "segments": segments}), flush=True)
    reserved: dict[bytes, Slot] = {}
    for line in sys.stdin:
        command = json.loads(line)
        keys = [bytes.fromhex(k) for k in command.get("keys", [])]
        if command["op"] == "reserve":
            for key in keys:
                slot = store.reserve(key, command["nbytes"], owner="peer", deadline_s=float("inf"))
                assert isinstance(slot, Slot), slot
                reserved[key] = slot
            regions = [reserved[k].region for k in keys]
            reply: dict = {"slots": [[r.segment_id, r.offset] for r in regions]}
        elif command["op"] == "checksums":
            reply = {"sums": [chunk_checksum(store.view(reserved[k])).hex() for k in keys]}
        else:
            break
        print(json.dumps(reply), flush=True)
    channel.close()


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    _peer_main(int(sys.argv[2]))
