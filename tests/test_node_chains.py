"""Chain lookups between real members in one process (real ZMQ on 127.0.0.1, tcp channel):
one member answers for a whole prompt, the slices of a chunked prefill make one entry, and a
stale entry (an evicted chunk, a dead holder) loads correctly or misses, never wrong bytes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from meshkv.dataplane import messages as m
from meshkv.node import ChainSlice, MeshNode
from tests.conftest import wait_until
from tests.test_node import CHUNK_BYTES, Mesh, chunk, keys_for

PROMPT_CHUNKS = 64  # 4 groups: up to 4 homes without the chain index


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    mesh = Mesh("tcp")
    try:
        yield mesh
    finally:
        mesh.stop()


def head_home(mesh: Mesh, keys: list[bytes]) -> MeshNode:
    home = mesh.nodes[0].membership.ring().current.home(keys[0])
    return next(n for n in mesh.nodes if n.name == home)


def put_in_slices(producer: MeshNode, keys: list[bytes], slice_chunks: int) -> None:
    """Stores a prompt as a chunked prefill saves it: slice by slice, each naming the head."""
    for start in range(0, len(keys), slice_chunks):
        part = keys[start : start + slice_chunks]
        stored = producer.put(part, [chunk(k) for k in part],
                              chains=[ChainSlice(keys[0], start, len(part))])  # fmt: skip
        assert stored == len(part)


def lookups_served(mesh: Mesh) -> int:
    return sum(n.lookups_answered() for n in mesh.nodes)


def lookup_async(node: MeshNode, keys: list[bytes]) -> int:
    answered = threading.Event()
    found: list[int] = []

    def done(count: int) -> None:
        found.append(count)
        answered.set()

    node.lookup_async(keys, done)
    assert answered.wait(15), "lookup_async never answered"
    return found[0]


def test_slices_of_a_chunked_prefill_make_one_entry_that_answers_the_whole_prompt(
    mesh: Mesh,
) -> None:
    for name in ("a", "b", "c", "d"):
        mesh.add(name)
    keys = keys_for(PROMPT_CHUNKS, salt="one-entry")
    home = head_home(mesh, keys)
    others = [n for n in mesh.nodes if n is not home]
    producer, reader = others[0], others[1]
    put_in_slices(producer, keys, slice_chunks=24)
    mesh.settle()
    wait_until("the chain entry is whole", lambda: home.directory.chains.chunks == PROMPT_CHUNKS)
    assert len(home.directory.chains) == 1
    before = lookups_served(mesh)
    assert reader.lookup(keys) == PROMPT_CHUNKS
    assert lookups_served(mesh) - before == 1  # the head's home alone, not one per group
    assert lookup_async(reader, keys) == PROMPT_CHUNKS
    assert lookups_served(mesh) - before == 2
    assert lookup_async(home, keys) == PROMPT_CHUNKS  # its own entry: no round trip
    assert lookups_served(mesh) - before == 2


def test_a_stale_entry_naming_a_holder_that_evicted_the_chunks_loads_only_true_bytes(
    mesh: Mesh,
) -> None:
    for name in ("a", "b", "c"):
        mesh.add(name, enable_p2p=False)  # chunks stay where they are put: nothing is pushed
    keys = keys_for(PROMPT_CHUNKS, salt="evicted")
    home = head_home(mesh, keys)
    holder, reader = [n for n in mesh.nodes if n is not home]
    assert holder.put(keys[:20], [chunk(k) for k in keys[:20]]) == 20
    notice = m.ChainAt(req=1, epoch=0, head=keys[0], start=0, keys=keys, holder=holder.name)
    ask_raw_one_way(home, notice)  # the holder said it held all 64; it kept (or has left) 20
    wait_until("the entry is in", lambda: home.directory.chains.chunks == PROMPT_CHUNKS)
    assert reader.lookup(keys) == PROMPT_CHUNKS  # the stale entry is believed...
    with reader.get(keys, CHUNK_BYTES) as lease:  # ...but only what exists loads: a miss
        assert lease.count == 20
        assert all(np.array_equal(v, chunk(k)) for k, v in zip(keys, lease.views, strict=False))


def test_a_dead_holder_in_an_entry_is_skipped_and_the_homes_answer(mesh: Mesh) -> None:
    for name in ("a", "b", "c", "d"):
        mesh.add(name)
    keys = keys_for(PROMPT_CHUNKS, salt="dead")
    home = head_home(mesh, keys)
    others = [n for n in mesh.nodes if n is not home]
    producer, reader = others[0], others[1]
    put_in_slices(producer, keys, slice_chunks=PROMPT_CHUNKS)
    mesh.settle()  # every chunk is at its home too
    wait_until("the chain entry is whole", lambda: home.directory.chains.chunks == PROMPT_CHUNKS)
    producer.stop(leave=False)  # dies: no hand-off, no goodbye
    mesh.nodes.remove(producer)
    wait_until("the producer is dead to all", lambda: all(
        not n.membership.is_alive(producer.name) for n in mesh.nodes))  # fmt: skip
    held_by_homes = reader.lookup(keys)
    assert held_by_homes <= PROMPT_CHUNKS
    with reader.get(keys, CHUNK_BYTES) as lease:
        assert lease.count == held_by_homes
        assert all(np.array_equal(v, chunk(k)) for k, v in zip(keys, lease.views, strict=False))


def ask_raw_one_way(member: MeshNode, notice: m.Message) -> None:
    """Sends a one-way notice from a bare socket, then a lookup on the same connection: its
    reply means the notice (sent first) has been handled."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{member.data_address}")
    codec = m.make_codec(1 << 20)
    try:
        sock.send(m.encode(codec, notice))
        sock.send(m.encode(codec, m.Lookup(req=2, epoch=0, keys=[])))
        assert sock.poll(10_000), "no reply"
        assert isinstance(m.decode(codec, sock.recv()), m.LookupReply)
    finally:
        sock.close(linger=0)
