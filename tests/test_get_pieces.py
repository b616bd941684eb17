"""A large chunk travels in pieces, each checked as it lands; a bad piece is a miss, never KV.

`Arrivals` is tested on a real store with replies made here (pieces out of order, a missing
reply, a disagreeing checksum, a short payload); the members' tests run real ZMQ on 127.0.0.1
with both channels.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane import messages as m
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.node import MeshNode
from meshkv.node.arrivals import Arrivals
from meshkv.node.fetch import plan
from meshkv.store import ChunkStore, chunk_checksum, chunk_hasher
from tests.test_node import Mesh, ask_raw, chunk, keys_for
from tests.test_node import mesh as mesh  # the same fixture: both channels

LARGE = 2 * DataPlaneConfig().fetch_request_bytes + 12288  # three pieces, the last one short
OWNER = "reader"


@given(st.binary(max_size=5000), st.lists(st.integers(0, 5000), max_size=6))
def test_a_checksum_taken_in_pieces_is_the_checksum(data: bytes, cuts: list[int]) -> None:
    hasher = chunk_hasher()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for first, past in itertools.pairwise(bounds):
        hasher.update(data[first:past])
    assert hasher.digest() == chunk_checksum(data)


class Reader:
    """A store with one reserved chunk of LARGE bytes, fetched as `plan` splits it."""

    def __init__(self) -> None:
        self.store = ChunkStore.with_budget(64 << 20)
        self.key = keys_for(1)[0]
        self.data = chunk(self.key, LARGE)
        self.arrivals = Arrivals([self.key], ["holder/0"], self.store, OWNER)
        assert self.arrivals.reserve(0, 1, LARGE, time.monotonic() + 60) == 1
        self.pieces = plan(0, 1, LARGE)
        self.dests = [self.arrivals.expect(piece) for piece in self.pieces]

    def land(self, index: int, checksum: bytes | None = None, payload: bytes | None = None) -> None:
        """Piece ``index`` arrives as a holder would send it over tcp (payload in the reply)."""
        piece = self.pieces[index]
        part = self.data[piece.offset : piece.offset + piece.nbytes].tobytes()
        reply = m.GetReply(
            req=index,
            checksums=[chunk_checksum(self.data) if checksum is None else checksum],
            payloads=[part if payload is None else payload],
        )
        self.arrivals.answered(piece, reply)


def test_pieces_landing_out_of_order_commit_the_chunk_once_all_are_in() -> None:
    reader = Reader()
    assert len(reader.pieces) == 3 and [d[0].offset for d in reader.dests] == [
        p.offset for p in reader.pieces
    ], "a piece's destination is the piece's own place in the slot"
    for index in (2, 0):
        reader.land(index)
        assert not reader.store.lookup(reader.key)
    reader.land(1)
    assert reader.arrivals.finish() == {0}
    [slot] = reader.store.pin([reader.key], owner="t", deadline_s=time.monotonic() + 5)
    assert np.array_equal(reader.store.view(slot), reader.data)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda r: r.land(1, checksum=b"\0" * 16),  # a reply that disagrees on the checksum
        lambda r: r.land(1, payload=b"short"),  # a payload of the wrong length
        lambda r: r.land(1, payload=bytes(r.pieces[1].nbytes)),  # torn: zeros, right length
        lambda r: r.arrivals.answered(r.pieces[1], m.Error(req=1, reason="busy")),
    ],
    ids=["checksums-disagree", "short-payload", "torn-piece", "error-reply"],
)
def test_a_bad_piece_is_a_miss_and_the_slot_is_freed(spoil: Callable[[Reader], None]) -> None:
    reader = Reader()
    reader.land(0)
    spoil(reader)
    reader.land(2)
    assert reader.arrivals.finish() == set()
    assert not reader.store.lookup(reader.key)
    assert reader.store.stats().reserved == 0


def test_a_chunk_with_an_unanswered_piece_stays_reserved_until_it_expires() -> None:
    reader = Reader()
    reader.land(0)
    reader.land(2)  # piece 1 never answered: its holder may still write into the slot
    assert reader.arrivals.finish() == set()
    assert reader.store.stats().reserved == 1
    assert reader.store.expire(time.monotonic() + 120)[0].what == "reservation"


def _fetcher(nodes: list[MeshNode], key: bytes) -> MeshNode:
    """A member that does not hold ``key`` (so a get must fetch it)."""
    return next(node for node in nodes if not node.store.lookup(key))


def test_a_large_chunk_arrives_byte_identical_in_pieces(mesh: Mesh) -> None:
    a, b, c = mesh.add("a"), mesh.add("b"), mesh.add("c")
    [key] = keys_for(1, "large")
    assert a.put([key], [chunk(key, LARGE)]) == 1
    mesh.settle()
    reader = _fetcher([b, c], key)
    gets_before = sum(n.server.stats["rx_get"] for n in (a, b, c))
    with reader.get([key], LARGE) as lease:
        assert lease.count == 1
        assert np.array_equal(lease.views[0], chunk(key, LARGE))
    assert sum(n.server.stats["rx_get"] for n in (a, b, c)) - gets_before == 3  # the pieces


def test_a_corrupted_last_piece_is_never_returned(mesh: Mesh) -> None:
    a, b, c = mesh.add("a"), mesh.add("b"), mesh.add("c")
    [key] = keys_for(1, "corrupt")
    a.put([key], [chunk(key, LARGE)])
    mesh.settle()
    for node in (a, b, c):  # every copy: its last byte, in the last piece
        slots = node.store.pin([key], owner="test", deadline_s=time.monotonic() + 5)
        if slots:
            node.store.view(slots[0])[-1] ^= 0xFF
            node.store.unpin(slots, owner="test")
    reader = _fetcher([b, c], key)
    with reader.get([key], LARGE) as lease:
        assert lease.count == 0
    assert reader.store.stats().reserved == 0


def test_a_piece_outside_its_chunk_is_refused_and_pins_nothing() -> None:
    mesh = Mesh("tcp")  # (over NIXL a get needs a handshake first; the check is the same code)
    try:
        a = mesh.add("a")
        [key] = keys_for(1, "range")
        a.put([key], [chunk(key, 8192)])
        for offset, nbytes in ((4096, 8192), (8192, 1)):
            get = m.Get(req=1, epoch=0, sender="x/0", keys=[key], dest=[], budget_ms=1000,
                        sent_ms=m.wall_clock_ms(), offset=offset, nbytes=nbytes)  # fmt: skip
            reply = ask_raw(a, get)
            assert isinstance(reply, m.Error) and reply.reason == "bad_range"
        assert a.server.stats["refused_bad_range"] == 2
        assert a.store.stats().pinned == 0
    finally:
        mesh.stop()
