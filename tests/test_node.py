"""MeshNode end to end in one process: real ZMQ on 127.0.0.1, real NIXL (UCX) and tcp channels."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from meshkv.config import MeshConfig
from meshkv.dataplane import messages as m
from meshkv.keys import chunk_keys, root_key
from meshkv.node import MeshNode, locate
from meshkv.store import Refusal
from tests.conftest import wait_until

os.environ.setdefault("UCX_NET_DEVICES", "lo")
NAMESPACE = "ab" * 16
CHUNK_BYTES = 64 * 1024


def make_config(channel: str, seeds: list[str], **extra: object) -> MeshConfig:
    settings: dict[str, object] = {
        "enable_p2p": True,
        "max_local_cpu_size": 0.0625,  # 64 MiB
        "transfer_channel": channel,
        "mesh_seeds": seeds,
        "mesh_gossip_profile": "test",
        "mesh_transfer_timeout_ms": 10000,  # generous: CI machines are small and busy
        "mesh_replicas": 1,  # one copy at each home: these tests follow it (test_replicas: 2)
    }
    return MeshConfig(**{**settings, **extra})


def chunk(key: bytes, nbytes: int = CHUNK_BYTES) -> np.ndarray:
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def keys_for(n: int, salt: str = "") -> list[bytes]:
    tokens = np.arange(n * 16) % 997
    return chunk_keys(root_key(bytes.fromhex(NAMESPACE), salt), tokens, 16)


def ask_raw(member: MeshNode, request: m.Message) -> m.Message:
    """Sends one request to ``member``'s data port from a bare socket; its reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{member.data_address}")
    codec = m.make_codec(1 << 20)
    try:
        sock.send(m.encode(codec, request))
        assert sock.poll(10_000), "no reply"
        return m.decode(codec, sock.recv())
    finally:
        sock.close(linger=0)


class Mesh:
    """Nodes started in this process; stopped at the end of the test."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.nodes: list[MeshNode] = []

    def add(self, name: str, **extra: object) -> MeshNode:
        seeds = [self.nodes[0].gossip_address] if self.nodes else []
        node = MeshNode(
            make_config(self.channel, seeds, lmcache_instance_id=name, **extra),
            namespace=NAMESPACE,
        )
        node.start()
        self.nodes.append(node)
        wait_until(
            "every node sees every other",
            lambda: all(len(n.members()) == len(self.nodes) for n in self.nodes),
        )
        wait_until(
            "one ring epoch", lambda: len({n.membership.ring().epoch for n in self.nodes}) == 1
        )
        return node

    def settle(self) -> None:
        wait_until("pushes done", lambda: all(n.pusher.idle() for n in self.nodes))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(params=["tcp", pytest.param("nixl", marks=pytest.mark.nixl)])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    mesh = Mesh(request.param)
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.mark.parametrize("batch", [1, 64])
def test_put_at_a_get_from_b_and_c_is_byte_identical(mesh: Mesh, batch: int) -> None:
    a, b, c = mesh.add("a"), mesh.add("b"), mesh.add("c")
    keys = keys_for(batch)
    assert a.put(keys, [chunk(k) for k in keys]) == batch
    mesh.settle()
    for reader in (b, c):
        assert reader.lookup(keys) == batch
        with reader.get(keys, CHUNK_BYTES) as lease:
            assert lease.count == batch
            for key, view in zip(keys, lease.views, strict=True):
                assert np.array_equal(view, chunk(key))


def test_partial_prefix_hit_stops_at_first_miss(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    keys = keys_for(8)
    a.put(keys[:5], [chunk(k) for k in keys[:5]])
    mesh.settle()
    assert b.lookup(keys) == 5
    with b.get(keys, CHUNK_BYTES) as lease:
        assert lease.count == 5


def test_a_get_of_chunks_at_their_homes_asks_no_lookup_first(mesh: Mesh) -> None:
    a, b, c = mesh.add("a"), mesh.add("b"), mesh.add("c")
    keys = keys_for(64)  # 4 groups of chunks, so 4 homes at most
    assert {c.membership.ring().current.home(k) for k in keys} - {"c/0"}, "all homed at c"
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    lookups_before = sum(n.lookups_answered() for n in (a, b))
    with c.get(keys, CHUNK_BYTES) as lease:
        assert lease.count == 64
        assert all(np.array_equal(v, chunk(k)) for k, v in zip(keys, lease.views, strict=True))
    assert sum(n.lookups_answered() for n in (a, b)) == lookups_before
    assert sum(n.server.stats["rx_get"] for n in (a, b)) >= 1


def test_a_first_home_takes_its_own_miss_as_final_once_its_ring_settled(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    prompt = next(
        keys
        for keys in (keys_for(32, salt=str(i)) for i in range(200))
        if a.membership.ring().current.home(keys[0]) == "a/0"
        and {a.membership.ring().current.home(k) for k in keys} == {"a/0", "b/0"}
    )  # held by nobody; a is its first home, b the home of a later group
    asked = lambda: b.lookups_answered()  # noqa: E731
    before = asked()
    assert a.lookup(prompt) == 0  # a's ring just changed: it also asks the other candidates
    assert asked() > before
    monkeypatch.setattr(locate, "SETTLING_S", 0.0)
    before = asked()
    assert a.lookup(prompt) == 0
    assert asked() == before, "a settled first home's miss is final: no round trip"
    b.put(prompt[:4], [chunk(k) for k in prompt[:4]])  # a hit is still found through a
    mesh.settle()
    assert a.lookup(prompt) == 4


def test_a_miss_asks_a_moved_keys_previous_home_only_while_the_ring_settles(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    mesh.settle()
    c = mesh.add("c")
    view = b.membership.ring()
    assert view.previous is not None and "c/0" not in view.previous.members
    prompt = next(
        keys
        for keys in (keys_for(16, salt=f"moved{i}") for i in range(400))
        if view.current.home(keys[0]) == "c/0" and view.previous.home(keys[0]) == "a/0"
    )  # held by nobody; its home moved from a to c when c joined
    before = a.lookups_answered(), c.lookups_answered()
    assert b.lookup(prompt) == 0  # c just joined: its pointers may not all be in yet
    assert (a.lookups_answered(), c.lookups_answered()) == (before[0] + 1, before[1] + 1)
    monkeypatch.setattr(locate, "SETTLING_S", 0.0)
    before = a.lookups_answered(), c.lookups_answered()
    assert b.lookup(prompt) == 0
    assert (a.lookups_answered(), c.lookups_answered()) == (before[0], before[1] + 1), (
        "a settled ring's miss at the current home is final: no previous-home round trip"
    )


def test_lookups_go_to_a_members_lookup_port_or_its_data_port_without_one(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b", mesh_lookup_stream=False)
    c = mesh.add("c")
    assert a.lookup_port is not None and b.lookup_port is None
    ring = c.membership.ring().current
    candidates = [keys_for(16, salt=f"ports{i}") for i in range(200)]  # one group: one home
    for home, answered in (
        (a, lambda: a.lookup_port.stats["rx_lookup"]),  # type: ignore[union-attr]
        (b, lambda: b.server.stats["rx_lookup"]),
    ):
        prompt = next(p for p in candidates if ring.home(p[0]) == home.name)
        a.put(prompt, [chunk(k) for k in prompt])
        mesh.settle()
        before = answered()
        assert c.lookup(prompt) == 16
        assert answered() == before + 1


def test_fetched_chunks_stay_local(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    keys = keys_for(4)
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    b.get(keys, CHUNK_BYTES).release()
    assert b.store.lookup_prefix(keys) == 4


def test_a_newcomer_finds_chunks_homed_at_it_through_pointers(mesh: Mesh) -> None:
    a = mesh.add("a")
    keys = keys_for(32)
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    b = mesh.add("b")  # home of some keys it never saw; a points them out on its join
    homed_at_b = [k for k in keys if b.membership.ring().current.home(k) == "b/0"]
    wait_until("a's pointers reach b", lambda: all(b.directory.holder_of(k) for k in homed_at_b))
    wait_until("b finds all 32", lambda: b.lookup(keys) == 32, 5)
    with b.get(keys, CHUNK_BYTES) as lease:
        assert lease.count == 32


def test_join_falls_back_to_previous_home_and_repairs(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    keys = keys_for(64)
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    c = mesh.add("c")  # the new home of about a third of the keys, holding none of them yet
    moved = [k for k in keys if b.membership.ring().current.home(k) == "c/0"]
    assert moved and not any(c.store.lookup(k) for k in moved)
    wait_until(
        "join-time pointers at c", lambda: len(c.directory) >= len(moved)
    )  # the join-time pointers are in
    c.directory.forget_holder("a/0")  # as if the join's pointers were lost:
    c.directory.forget_holder("b/0")  # only the previous-epoch fallback can find them now
    assert b.lookup(keys) == 64
    with b.get(keys, CHUNK_BYTES) as lease:
        assert lease.count == 64
    mesh.settle()
    assert sum(c.store.lookup(k) for k in moved) > 0, "read repair should reach the new home"
    assert c.lookup(keys) == 64


def test_graceful_leave_is_invisible_to_readers(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    c = mesh.add("c")
    keys = keys_for(16)
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    mesh.nodes.remove(c)
    c.stop()
    wait_until("b sees two members", lambda: len(b.members()) == 2)
    with b.get(keys, CHUNK_BYTES, timeout_s=2.0) as lease:
        # a produced every chunk and keeps its copies; homes that left cost nothing visible
        assert lease.count == 16


def test_no_room_is_a_miss_not_an_error(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b", max_local_cpu_size=0.001)  # 1 MiB: 16 chunks at most
    keys = keys_for(32)
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    with b.get(keys, CHUNK_BYTES) as lease:
        assert 0 < lease.count < 32
        for key, view in zip(keys, lease.views, strict=False):
            assert np.array_equal(view, chunk(key))


def test_corrupted_chunk_is_never_returned(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    keys = keys_for(4)
    a.put(keys, [chunk(k) for k in keys])
    mesh.settle()
    for node in (a, b):  # corrupt every copy of the third chunk, wherever it was pushed
        slots = node.store.pin([keys[2]], owner="test", deadline_s=time.monotonic() + 5)
        if slots:
            node.store.view(slots[0])[0] ^= 0xFF
            node.store.unpin(slots, owner="test")
    c = mesh.add("c")
    wait_until(
        "c finds all 4", lambda: c.lookup(keys) == 4
    )  # once a's and b's join-time pointers arrived
    for reader in (a, b, c):  # a: all local; b: some local; c: all fetched
        caplog.clear()
        with reader.get(keys, CHUNK_BYTES) as lease:
            assert lease.count == 2, reader.name
            for key, view in zip(keys, lease.views, strict=False):
                assert np.array_equal(view, chunk(key))
    # c fetched the bad chunk once from each holder it asked (a hedged get may ask a second
    # one): its second round does not ask the same holder again
    failed = [r.getMessage() for r in caplog.records if "failed its checksum" in r.getMessage()]
    assert 1 <= len(failed) == len(set(failed)), failed


def test_put_of_a_held_key_counts_and_reserve_refuses(mesh: Mesh) -> None:
    a = mesh.add("a")
    keys = keys_for(2)
    assert a.put(keys, [chunk(k) for k in keys]) == 2
    assert a.put(keys, [chunk(k) for k in keys]) == 2
    assert a.store.reserve(keys[0], CHUNK_BYTES, owner="x", deadline_s=time.monotonic() + 1) is (
        Refusal.PRESENT
    )


@pytest.mark.nixl
def test_a_nixl_get_that_names_no_destination_is_refused_and_serving_goes_on() -> None:
    mesh = Mesh("nixl")
    try:
        nodes = [mesh.add(name) for name in ("a", "b", "c")]
        keys = keys_for(2, "nodest")
        nodes[0].put(keys, [chunk(k) for k in keys])
        mesh.settle()
        reader = next(n for n in nodes if not n.store.lookup(keys[0]))
        before = {n.name: n.server.stats["rx_get"] for n in nodes}
        reader.get(keys[:1], CHUNK_BYTES).release()  # a real get: the handshake is done
        holder = next(n for n in nodes if n.server.stats["rx_get"] > before[n.name])
        # the handshaken reader's name, but nowhere to write
        forged = m.Get(
            req=1, epoch=0, sender=reader.name, keys=keys, dest=[], budget_ms=1000,
            sent_ms=m.wall_clock_ms(),
        )  # fmt: skip
        reply = ask_raw(holder, forged)
        assert isinstance(reply, m.Error) and reply.reason == "malformed"
        assert holder.store.stats().pinned == 0
        with reader.get(keys, CHUNK_BYTES) as lease:  # the holder still serves
            assert lease.count == 2
    finally:
        mesh.stop()


def test_a_get_read_after_its_requester_gave_up_is_refused_and_pins_nothing() -> None:
    mesh = Mesh("tcp")
    try:
        a = mesh.add("a")
        [key] = keys_for(1, "late")
        a.put([key], [chunk(key, 8192)])
        gave_up_ms = m.wall_clock_ms() - 1000 - m.LATE_WRITE_MS - 1
        late = m.Get(req=1, epoch=0, sender="x/0", keys=[key], dest=[], budget_ms=1000,
                     sent_ms=gave_up_ms)  # fmt: skip
        reply = ask_raw(a, late)
        assert isinstance(reply, m.Error) and reply.reason == "expired"
        assert a.server.stats["refused_expired"] == 1
        assert a.store.stats().pinned == 0
        on_time = m.Get(req=2, epoch=0, sender="x/0", keys=[key], dest=[], budget_ms=1000,
                        sent_ms=m.wall_clock_ms())  # fmt: skip
        reply = ask_raw(a, on_time)
        assert isinstance(reply, m.GetReply) and len(reply.checksums) == 1
    finally:
        mesh.stop()
