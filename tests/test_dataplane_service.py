"""The data-plane service core's behaviours, driven by plain calls: no socket, no thread, no clock.

Each test builds a `DataService` over a real store and a real channel, hands it decoded
messages with an explicit ``now``, and checks the replies, the writes it orders and the store.
The NIXL path's tests load real NIXL agents (two in this process; nothing is written)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from meshkv.dataplane import messages as m
from meshkv.dataplane.byte_path import InlineBytes, NixlWrite, WriteOrder
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.dataplane.handshake import greeting
from meshkv.dataplane.service import DataService, Step
from meshkv.errors import UsageError
from meshkv.ring.view import RingView
from meshkv.store import ChunkStore, chunk_checksum
from meshkv.transfer import Channel, TcpChannel

ME = "holder/0"
PEER = b"\x00peer-identity"
CHUNK_BYTES = 8192
WALL_MS = 1_000_000  # the wall clock both sides read in these tests
CONFIG = DataPlaneConfig()


class Core:
    """A service core over a real store, with the live members a test names."""

    def __init__(self, store: ChunkStore | None = None, channel: Channel | None = None) -> None:
        self.store = store or ChunkStore.with_budget(1 << 20, segment_bytes=1 << 20)
        self.directory = HolderDirectory()
        self.ring = RingView([ME, "other/0"], vnodes=16)
        self.alive = {ME, "other/0"}
        self.checksums: dict[bytes, bytes] = {}
        path = (
            NixlWrite(channel)  # type: ignore[arg-type]
            if channel is not None
            else InlineBytes(TcpChannel(), self.store.pool, reply_max_bytes=1 << 20)
        )
        self.service = DataService(
            name=ME,
            nonce=7,
            store=self.store,
            path=path,
            directory=self.directory,
            ring=lambda: self.ring,
            holder_alive=self.alive.__contains__,
            config=CONFIG,
        )

    def hold(self, count: int) -> list[bytes]:
        """Stores ``count`` chunks of distinct bytes; their keys."""
        keys = [secrets.token_bytes(16) for _ in range(count)]
        for key in keys:
            slot = self.store.reserve(key, CHUNK_BYTES, owner="test", deadline_s=1e9)
            view = self.store.view(slot)
            view[:] = 0
            view[:16] = list(key)
            self.checksums[key] = chunk_checksum(view)
            assert self.store.commit(key, self.checksums[key], owner="test") is not None
        return keys

    def ask(self, message: m.Message, now_s: float = 0.0, wall_ms: int = WALL_MS) -> Step:
        return self.service.handle(PEER, message, now_s, wall_ms=wall_ms)

    def only_reply(self, message: m.Message, now_s: float = 0.0) -> m.Message:
        step = self.ask(message, now_s)
        assert len(step.replies) == 1 and not step.writes
        assert step.replies[0].to == PEER
        return step.replies[0].message


def get(keys: list[bytes], *, sender: str = "reader/0", dest: list[m.SlotRef] | None = None,
        budget_ms: int = 1000, sent_ms: int = WALL_MS, **piece: int) -> m.Get:  # fmt: skip
    return m.Get(req=5, epoch=0, sender=sender, keys=keys, dest=dest or [],
                 budget_ms=budget_ms, sent_ms=sent_ms, **piece)  # fmt: skip


def test_a_lookup_answers_the_held_prefix_then_live_pointers_up_to_the_first_gap() -> None:
    core = Core()
    held = core.hold(2)
    elsewhere = [secrets.token_bytes(16) for _ in range(3)]
    core.directory.record(elsewhere[:1], "other/0")
    core.directory.record(elsewhere[1:2], "dead/0")  # known, but not alive: the chain ends
    core.directory.record(elsewhere[2:], "other/0")
    reply = core.only_reply(m.Lookup(req=1, epoch=0, keys=held + elsewhere))
    assert isinstance(reply, m.LookupReply)
    assert (reply.held, reply.pointers, reply.runs) == (2, ["other/0"], [1])
    assert reply.epoch == core.ring.epoch
    assert core.service.stats["rx_lookup"] == 1


def test_a_chain_entry_answers_for_the_whole_prompt_in_runs_up_to_a_dead_holder() -> None:
    core = Core()
    prompt = core.hold(2) + [secrets.token_bytes(16) for _ in range(6)]
    core.alive.add("far/0")
    notice = m.ChainAt(req=3, epoch=999, head=prompt[0], start=0, keys=prompt[:5], holder="far/0")
    assert core.ask(notice).replies == []  # one-way, any epoch
    slice_2 = m.ChainAt(req=4, epoch=0, head=prompt[0], start=5, keys=prompt[5:], holder="dead/0")
    assert core.ask(slice_2).replies == []  # a later slice of the same prompt: the same entry
    assert len(core.directory.chains) == 1 and core.directory.chains.chunks == 8
    reply = core.only_reply(m.Lookup(req=1, epoch=0, keys=prompt))
    assert isinstance(reply, m.LookupReply)
    assert (reply.held, reply.pointers, reply.runs) == (2, ["far/0"], [3])  # dead/0: stops
    core.alive.add("dead/0")
    reply = core.only_reply(m.Lookup(req=2, epoch=0, keys=prompt))
    assert reply.holders(ME) == [ME] * 2 + ["far/0"] * 3 + ["dead/0"] * 3


def test_a_chain_slice_that_leaves_a_gap_is_dropped_and_counted() -> None:
    core = Core()
    prompt = [secrets.token_bytes(16) for _ in range(4)]
    core.ask(m.ChainAt(req=3, epoch=0, head=prompt[0], start=2, keys=prompt[2:], holder="a/0"))
    assert len(core.directory.chains) == 0
    assert core.service.stats["chain_at_dropped"] == 1


def test_a_held_at_hint_is_recorded_whatever_its_epoch_and_needs_no_reply() -> None:
    core = Core()
    key = secrets.token_bytes(16)
    step = core.ask(m.HeldAt(req=1, epoch=12345, keys=[key], holder="other/0"))
    assert step == Step() and core.directory.holder_of(key) == "other/0"


def test_an_inline_get_carries_the_bytes_and_keeps_them_pinned_until_sent() -> None:
    core = Core()
    keys = core.hold(3)
    step = core.ask(get(keys))
    (reply,) = step.replies
    assert isinstance(reply.message, m.GetReply) and not step.writes
    assert [bytes(p[:16]) for p in reply.message.payloads] == keys
    assert reply.message.checksums == [chunk_checksum(p) for p in reply.message.payloads]
    assert core.store.stats().pinned == 3  # the payloads are views of the slots
    assert reply.on_sent is not None
    reply.on_sent()
    assert core.store.stats().pinned == 0


def test_a_get_for_a_piece_carries_only_that_piece_and_a_piece_outside_is_refused() -> None:
    core = Core()
    (key,) = core.hold(1)
    (reply,) = core.ask(get([key], offset=4096, nbytes=4096)).replies
    assert [len(p) for p in reply.message.payloads] == [4096]
    reply.on_sent()
    refused = core.only_reply(get([key], offset=4096, nbytes=8192))
    assert refused == m.Error(req=5, reason="bad_range")
    assert core.service.stats["refused_bad_range"] == 1 and core.store.stats().pinned == 0


def test_a_get_of_nothing_held_is_answered_empty() -> None:
    core = Core()
    reply = core.only_reply(get([secrets.token_bytes(16)]))
    assert reply == m.GetReply(req=5, checksums=[])


def test_a_get_read_after_its_requester_gave_up_is_refused_as_expired() -> None:
    core = Core()
    keys = core.hold(1)
    late_ms = WALL_MS + 1000 + m.LATE_WRITE_MS  # the budget and the clock tolerance are spent
    reply = core.service.handle(PEER, get(keys), 0.0, wall_ms=late_ms).replies[0].message
    assert reply == m.Error(req=5, reason="expired")
    assert core.service.stats["refused_expired"] == 1 and core.store.stats().pinned == 0


def test_a_put_of_another_epoch_is_refused() -> None:
    core = Core()
    put = m.Put(req=3, epoch=core.ring.epoch + 1, keys=[b"k" * 16], chunk_bytes=CHUNK_BYTES)
    assert core.only_reply(put) == m.Error(req=3, reason="stale_epoch")


def test_an_inline_put_stores_the_chunks_whose_bytes_match_their_checksums() -> None:
    core = Core()
    good, bad = bytes(range(256)) * 32, bytes(CHUNK_BYTES)
    keys = [secrets.token_bytes(16), secrets.token_bytes(16)]
    sums = [chunk_checksum(good), chunk_checksum(good)]
    put = m.Put(
        req=3, epoch=core.ring.epoch, keys=keys, chunk_bytes=CHUNK_BYTES, checksums=sums,
        payloads=[good, bad],
    )  # fmt: skip
    reply = core.only_reply(put)
    assert isinstance(reply, m.PutReply) and reply.stored == 1
    assert core.store.held_among(keys) == {keys[0]}
    assert core.service.stats["put_checksum_mismatch"] == 1


def test_a_reserved_put_is_published_by_a_commit_whose_checksum_matches() -> None:
    core = Core()
    keys = [secrets.token_bytes(16), secrets.token_bytes(16)]
    reply = core.only_reply(m.Put(req=3, epoch=core.ring.epoch, keys=keys, chunk_bytes=CHUNK_BYTES))
    assert isinstance(reply, m.PutReply) and all(reply.slots)
    for ref in reply.slots:  # the producer's WRITE lands in the reserved slots
        core.store.pool.segments[ref.segment].buffer[ref.offset : ref.offset + CHUNK_BYTES] = 7
    written = chunk_checksum(bytes([7]) * CHUNK_BYTES)
    commit = m.Commit(req=4, keys=keys, checksums=[written, b"\x00" * len(written)])
    assert core.only_reply(commit) == m.CommitReply(req=4, stored=1)
    assert core.store.held_among(keys) == {keys[0]}
    assert core.service.stats["commit_checksum_mismatch"] == 1


def test_reservations_expire_and_a_late_commit_finds_nothing() -> None:
    core = Core()
    key = secrets.token_bytes(16)
    put = m.Put(req=3, epoch=core.ring.epoch, keys=[key], chunk_bytes=CHUNK_BYTES)
    assert isinstance(core.only_reply(put, now_s=10.0), m.PutReply)
    assert core.service.expire(10.0 + CONFIG.put_reservation_s / 2) == []
    assert core.service.stats["expired_reservations"] == 0
    core.service.expire(10.0 + CONFIG.put_reservation_s + CONFIG.expire_interval_s)
    assert core.service.stats["expired_reservations"] == 1
    commit = m.Commit(req=4, keys=[key], checksums=[b"\x00" * 16])
    assert core.only_reply(commit) == m.CommitReply(req=4, stored=0)
    assert core.service.stats["commit_unknown"] == 1


def test_puts_past_the_reservation_bound_are_refused_as_busy() -> None:
    core = Core()
    core.service = DataService(
        name=ME, nonce=7, store=core.store, path=InlineBytes(TcpChannel(), core.store.pool,
        reply_max_bytes=1 << 20), directory=core.directory, ring=lambda: core.ring,
        holder_alive=core.alive.__contains__, config=DataPlaneConfig(reservations_max=2),
    )  # fmt: skip
    keys = [secrets.token_bytes(16) for _ in range(3)]
    epoch = core.ring.epoch
    assert isinstance(core.only_reply(m.Put(req=1, epoch=epoch, keys=keys[:2],
                                            chunk_bytes=CHUNK_BYTES)), m.PutReply)  # fmt: skip
    refused = core.only_reply(m.Put(req=2, epoch=epoch, keys=keys[2:], chunk_bytes=CHUNK_BYTES))
    assert refused == m.Error(req=2, reason="busy")


def test_a_hello_of_another_channel_kind_is_refused_and_a_forgotten_peer_must_greet_again() -> None:
    core = Core()
    hello = m.Hello(req=1, sender="reader/0", nonce=9, channel="nixl", agent=b"", segments=[])
    assert core.only_reply(hello) == m.Error(req=1, reason="channel_mismatch")
    assert not core.service.greeted("reader/0")
    reply = core.only_reply(greeting(TcpChannel(), req=2, name="reader/0", nonce=9))
    assert isinstance(reply, m.HelloReply) and (reply.sender, reply.nonce) == (ME, 7)
    assert core.service.greeted("reader/0")
    core.service.forget_peer("reader/0")
    assert not core.service.greeted("reader/0")


def test_a_message_the_service_does_not_serve_is_refused() -> None:
    core = Core()
    reply = core.only_reply(m.CommitReply(req=8, stored=1))
    assert reply == m.Error(req=8, reason="unexpected_type")


def test_reporting_a_transfer_that_is_not_in_flight_is_a_bug() -> None:
    with pytest.raises(UsageError):
        Core().service.transfer_done(99, "done")


# --- the NIXL path: gets become writes the driver posts ----------------------------------------


@pytest.fixture
def nixl_pair() -> Iterator[tuple[Core, Channel]]:
    """A core on a NIXL channel, and the reader's channel (another agent in this process)."""
    nixl_channel = pytest.importorskip("meshkv.transfer.nixl_channel")
    holder_store = ChunkStore.with_budget(1 << 20, segment_bytes=1 << 20)
    holder = nixl_channel.NixlChannel(f"holder-{secrets.token_hex(8)}", holder_store.pool)
    reader_store = ChunkStore.with_budget(1 << 20, segment_bytes=1 << 20)
    reader = nixl_channel.NixlChannel(f"reader-{secrets.token_hex(8)}", reader_store.pool)
    core = Core(store=holder_store, channel=holder)
    try:
        yield core, reader
    finally:
        holder.close()
        reader.close()


@pytest.mark.nixl
def test_a_nixl_get_is_served_only_to_a_greeted_peer_that_names_its_slots(nixl_pair) -> None:
    core, reader = nixl_pair
    keys = core.hold(2)
    dest = [m.SlotRef(0, 0), m.SlotRef(0, CHUNK_BYTES)]
    assert core.only_reply(get(keys, dest=dest)) == m.Error(req=5, reason="no_handshake")
    hello = greeting(reader, req=1, name="reader/0", nonce=3)
    assert isinstance(core.only_reply(hello), m.HelloReply)
    assert core.only_reply(get(keys)) == m.Error(req=5, reason="malformed")
    assert core.store.stats().pinned == 0


@pytest.mark.nixl
def test_a_nixl_get_orders_a_write_and_is_answered_when_it_completes(nixl_pair) -> None:
    core, reader = nixl_pair
    keys = core.hold(2)
    core.ask(greeting(reader, req=1, name="reader/0", nonce=3))
    dest = [m.SlotRef(0, 0), m.SlotRef(0, CHUNK_BYTES)]
    step = core.ask(get(keys, dest=dest), now_s=50.0)
    assert step.replies == [] and len(step.writes) == 1
    order = step.writes[0]
    assert isinstance(order, WriteOrder) and (order.peer, order.remote) == ("reader/0", dest)
    assert [r.nbytes for r in order.local] == [CHUNK_BYTES, CHUNK_BYTES]
    assert core.store.stats().pinned == 2 and core.service.transfers_in_flight == 1
    (reply,) = core.service.transfer_done(order.transfer, "done")
    assert reply.to == PEER and reply.message.checksums == [core.checksums[k] for k in keys]
    assert core.service.transfers_in_flight == 0 and core.store.stats().pinned == 0


@pytest.mark.nixl
def test_a_nixl_write_past_the_get_budget_is_abandoned_and_answered_empty(nixl_pair) -> None:
    core, reader = nixl_pair
    keys = core.hold(1)
    core.ask(greeting(reader, req=1, name="reader/0", nonce=3))
    (order,) = core.ask(get(keys, dest=[m.SlotRef(0, 0)], budget_ms=200), now_s=50.0).writes
    assert core.service.expire(50.1) == []
    assert core.service.expire(50.2) == [order.transfer]
    (reply,) = core.service.transfer_done(order.transfer, "timeout")
    assert reply.message == m.GetReply(req=5, checksums=[])
    assert core.service.stats["get_timeout"] == 1 and core.store.stats().pinned == 0


@pytest.mark.nixl
def test_a_failed_nixl_write_is_counted_and_answered_empty(nixl_pair) -> None:
    core, reader = nixl_pair
    keys = core.hold(1)
    core.ask(greeting(reader, req=1, name="reader/0", nonce=3))
    (order,) = core.ask(get(keys, dest=[m.SlotRef(0, 0)])).writes
    (reply,) = core.service.transfer_done(order.transfer, "failed")
    assert reply.message == m.GetReply(req=5, checksums=[])
    assert core.service.stats["get_transfer_failed"] == 1 and core.store.stats().pinned == 0
