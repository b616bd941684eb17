"""The data-plane service: one thread owns the ROUTER socket and answers peers' requests.

Fast requests (hello, lookup, put reservations, commits, held-at) are answered inline. A get
names whole chunks or one piece of one chunk. It pins the chunks, starts one batched NIXL WRITE
into the requester's slots, and is answered when the transfer completes or its budget runs
out: transfers are polled in the same loop, so a slow peer never blocks the others. A
transport that copies while it posts (UCX's cma) has finished when the post returns; such a
get is answered at once, so a requester's gets are answered one by one as they are written
(it checks request k while k + 1 is written) rather than together after the last. A get is
given the time its requester still waits, by the requester's clock (`messages.Get.time_left_s`):
one read after the requester gave up (this member was frozen, or its queue long) is refused as
expired, since the requester may have reused the slots it named.

A put needs agreement on the ring: one whose epoch is neither our current nor our previous one
is refused ("stale_epoch"). Held-at pointers are hints, taken whatever the epoch, and reads are
answered whatever the epoch: bytes are checked against the chunk checksum on arrival, so a
stale view can only cost a miss.

Every malformed frame is dropped and counted; nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from meshkv.dataplane import messages as m
from meshkv.dataplane.directory import HolderDirectory
from meshkv.errors import ProtocolError, TransportError, UsageError
from meshkv.ring.view import RingView
from meshkv.store import ChunkStore, Refusal, Region, Slot, chunk_checksum
from meshkv.transfer import Channel, TransferHandle
from meshkv.wire import Buffer, FrameCodec

log = logging.getLogger("vllm.meshkv.dataplane.server")

POLL_IDLE_MS = 200
"""Longest the loop sleeps with nothing in flight (stop requests wake it at once)."""
BUSY_SLEEP_MIN_S = 50e-6
BUSY_SLEEP_MAX_S = 1e-3
"""While transfers are in flight (their completion is polled, not signalled) the loop sleeps
between rounds, from MIN doubling to MAX while nothing happens: a small transfer is answered
within tens of microseconds of its end, a long one costs at most a wake-up per millisecond."""
INBOUND_HWM = 4096
PUT_RESERVATION_S = 10.0
"""How long a producer may take between a put's reply and its commit."""
EXPIRE_INTERVAL_S = 0.1
RESERVED_MAX = 65536
"""Reservations awaiting a commit; past this, puts are refused until some complete or expire."""


@dataclass(slots=True)
class _InFlightGet:
    identity: bytes
    request: m.Get
    owner: str
    slots: list[Slot]
    handle: TransferHandle
    deadline_s: float


class DataServer:
    """Serves lookup/get/put/commit/held-at for one member."""

    def __init__(
        self,
        *,
        context: zmq.Context,
        bind_host: str,
        port: int,
        codec: FrameCodec,
        member_name: str,
        store: ChunkStore,
        ring: Callable[[], RingView],
        directory: HolderDirectory,
        holder_alive: Callable[[str], bool],
        accept_any_epoch: bool = False,
    ) -> None:
        self._context = context
        self._codec = codec
        self._name = member_name
        self._nonce = 0
        self._store = store
        self._channel: Channel | None = None
        self._accept_any_epoch = accept_any_epoch
        self._ring = ring
        self._directory = directory
        self._holder_alive = holder_alive
        self._router = context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, INBOUND_HWM)
        self._router.setsockopt(zmq.SNDHWM, INBOUND_HWM)
        self._router.setsockopt(zmq.MAXMSGSIZE, codec.max_frame_bytes)
        if port:
            self._router.bind(f"tcp://{bind_host}:{port}")
        else:
            port = self._router.bind_to_random_port(f"tcp://{bind_host}")
        self.port = port
        self._wake_in = context.socket(zmq.PAIR)
        self._wake_out = context.socket(zmq.PAIR)
        wake_address = f"inproc://meshkv-data-wake-{id(self)}"
        self._wake_in.bind(wake_address)
        self._wake_out.connect(wake_address)
        self._wake_lock = threading.Lock()  # guards _wake_out
        self._in_flight: list[_InFlightGet] = []
        self._reserved: dict[tuple[str, bytes], Slot] = {}  # (owner, key) -> reserved slot
        self._next_expire_s = 0.0
        self._peers: dict[str, int] = {}  # member name -> nonce it said hello with
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshkv-data", daemon=True)
        self.stats: Counter[str] = Counter()

    def attach(self, *, nonce: int, channel: Channel) -> None:
        """Sets this boot's nonce and transfer channel (known only after the gossip runner and
        the channel exist, which both need this server's bound address)."""
        self._nonce = nonce
        self._channel = channel

    def start(self) -> None:
        if self._channel is None:
            raise UsageError("DataServer.attach() must be called before start()")
        self._running.set()
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._running.clear()
        self._wake()
        self._thread.join(timeout_s)
        with self._wake_lock:
            self._wake_out.close(linger=0)

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(zmq.Again):  # Again: a wake-up is queued
            self._wake_out.send(b"", zmq.NOBLOCK)

    # --- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        busy_sleep_s = BUSY_SLEEP_MIN_S
        try:
            while self._running.is_set():
                ready = dict(poller.poll(0 if self._in_flight else POLL_IDLE_MS))
                if self._wake_in in ready:
                    while self._wake_in.poll(0):
                        self._wake_in.recv()
                if self._router in ready:
                    self._receive_batch()
                in_flight = len(self._in_flight)
                self._poll_transfers()
                if ready or len(self._in_flight) < in_flight:
                    busy_sleep_s = BUSY_SLEEP_MIN_S
                elif self._in_flight:
                    time.sleep(busy_sleep_s)
                    busy_sleep_s = min(2 * busy_sleep_s, BUSY_SLEEP_MAX_S)
                if time.monotonic() >= self._next_expire_s:
                    self._expire()
                    self._next_expire_s = time.monotonic() + EXPIRE_INTERVAL_S
        finally:
            for get in self._in_flight:
                self._finish_get(get, ok=False)
            self._router.close(linger=0)
            self._wake_in.close(linger=0)

    def _receive_batch(self, max_frames: int = 256) -> None:
        for _ in range(max_frames):
            if not self._router.get(zmq.EVENTS) & zmq.POLLIN:
                return  # (asking is cheaper than the zmq.Again a recv would raise)
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(parts) < 2:
                self.stats["drop_bad_parts"] += 1
                continue
            identity, frame, *attachments = parts
            try:
                request = m.decode(self._codec, frame, attachments)
            except ProtocolError as exc:
                self.stats[f"drop_{exc.reason}"] += 1
                continue
            try:
                reply = self._handle(identity, request)
            except ProtocolError as exc:
                self.stats[f"refused_{exc.reason}"] += 1
                reply = m.Error(req=request.req, reason=exc.reason)
            if reply is not None:
                self._reply(identity, reply)

    def _reply(self, identity: bytes, reply: m.Message) -> None:
        """Sends a reply; its frames are copied into ZMQ before this returns."""
        try:
            frames = m.encode_frames(self._codec, reply)
            self._router.send_multipart([identity, *frames], zmq.NOBLOCK, copy=True)
            self.stats[f"tx_{reply.TYPE.name.lower()}"] += 1
        except zmq.Again:
            self.stats["reply_dropped"] += 1

    # --- handlers --------------------------------------------------------------------------

    def _handle(self, identity: bytes, request: m.Message) -> m.Message | None:
        self.stats[f"rx_{request.TYPE.name.lower()}"] += 1
        match request:
            case m.Hello():
                return self._hello(request)
            case m.Lookup():
                held = self._store.lookup_prefix(request.keys)
                return m.LookupReply(
                    req=request.req,
                    epoch=self._ring().epoch,
                    held=held,
                    pointers=self._pointers(request.keys[held:]),
                )
            case m.Get():
                return self._get(identity, request)
            case m.Put():
                return self._put(identity, request)
            case m.Commit():
                return m.CommitReply(req=request.req, stored=self._commit(identity, request))
            case m.HeldAt():  # a hint: whoever follows it checks the bytes, so any epoch
                self._directory.record(request.keys, request.holder)
                return None
        raise ProtocolError("unexpected_type", request.TYPE.name)

    def _hello(self, hello: m.Hello) -> m.Message:
        if hello.channel != self._channel.kind:
            raise ProtocolError("channel_mismatch", f"{hello.channel} != {self._channel.kind}")
        if self._peers.get(hello.sender) != hello.nonce:
            if not self._channel.add_peer(hello.sender, hello.agent, hello.segments):
                raise ProtocolError("bad_handshake", hello.sender)
            self._peers[hello.sender] = hello.nonce
        return m.HelloReply(
            req=hello.req,
            sender=self._name,
            nonce=self._nonce,
            channel=self._channel.kind,
            agent=self._channel.metadata(),
            segments=self._channel.segments(),
        )

    def forget_peer(self, name: str) -> None:
        """Called (from any thread) when gossip says a member died, left or restarted."""
        self._peers.pop(name, None)
        self._channel.remove_peer(name)

    def _pointers(self, keys: list[bytes]) -> list[str]:
        """Live holders the directory knows for the leading ``keys`` (stops at the first gap)."""
        holders: list[str] = []
        for key in keys:
            holder = self._directory.holder_of(key)
            if holder is None or not self._holder_alive(holder):
                break
            holders.append(holder)
        return holders

    def _get(self, identity: bytes, get: m.Get) -> m.Message | None:
        owner = f"get:{identity.hex()}:{get.req}"
        deadline_s = _deadline_of(get)
        if self._channel.kind == "tcp":
            self._get_inline(identity, get, owner, deadline_s)
            return None
        sender = self._sender_of(get)  # before pinning anything: whose slots would we write?
        if not get.dest:
            raise ProtocolError("malformed", "a get over NIXL names no destination slots")
        slots = self._store.pin(get.keys, owner=owner, deadline_s=deadline_s)
        if not slots:
            return m.GetReply(req=get.req, checksums=[])
        try:
            regions = _regions(get, slots)
        except ProtocolError:
            self._store.unpin(slots, owner=owner)
            raise
        try:
            handle = self._channel.post_write(sender, regions, get.dest[: len(slots)])
        except (TransportError, ProtocolError) as exc:  # ProtocolError: a slot out of bounds
            self.stats["get_transfer_failed"] += 1
            log.info("get from %s: transfer not started: %s", sender, exc)
            self._store.unpin(slots, owner=owner)
            return m.GetReply(req=get.req, checksums=[])
        posted = _InFlightGet(identity, get, owner, slots, handle, deadline_s)
        if self._channel.poll(handle) == "done":  # copied while posting: answer now
            self._finish_get(posted, ok=True)
        else:
            self._in_flight.append(posted)
        return None

    def _get_inline(self, identity: bytes, get: m.Get, owner: str, deadline_s: float) -> None:
        """tcp channel: the bytes go with the reply, copied once, from the pinned slots."""
        slots = self._store.pin(get.keys, owner=owner, deadline_s=deadline_s)
        try:
            regions = _regions(get, slots) if slots else []
            payloads = [memoryview(self._store.pool.view(region)) for region in regions]
            sums = [slot.checksum for slot in slots]
            self._reply(identity, m.GetReply(req=get.req, checksums=sums, payloads=payloads))
        finally:
            self._store.unpin(slots, owner=owner)

    def _sender_of(self, get: m.Get) -> str:
        if get.sender not in self._peers:
            raise ProtocolError("no_handshake", get.sender)
        return get.sender

    def _poll_transfers(self) -> None:
        if not self._in_flight:
            return
        now = time.monotonic()
        still: list[_InFlightGet] = []
        for get in self._in_flight:
            state = self._channel.poll(get.handle)
            if state == "done":
                self._finish_get(get, ok=True)
            elif state == "failed" or now >= get.deadline_s:
                self.stats["get_transfer_failed" if state == "failed" else "get_timeout"] += 1
                self._finish_get(get, ok=False)
            else:
                still.append(get)
        self._in_flight = still

    def _finish_get(self, get: _InFlightGet, *, ok: bool) -> None:
        self._channel.release(get.handle, failed=not ok)
        self._store.unpin(get.slots, owner=get.owner)
        sums = [slot.checksum for slot in get.slots] if ok else []
        self._reply(get.identity, m.GetReply(req=get.request.req, checksums=sums))

    def _put(self, identity: bytes, put: m.Put) -> m.Message:
        self._require_epoch(put.epoch)
        owner = f"put:{identity.hex()}"
        deadline_s = time.monotonic() + PUT_RESERVATION_S
        if put.payloads:  # tcp: the bytes are here
            stored = sum(
                self._store_inline(key, payload, checksum, owner, deadline_s)
                for key, payload, checksum in zip(
                    put.keys, put.payloads, put.checksums, strict=True
                )
            )
            return m.PutReply(req=put.req, epoch=self._ring().epoch, slots=[], stored=stored)
        if len(self._reserved) + len(put.keys) > RESERVED_MAX:
            raise ProtocolError("busy", "too many reservations awaiting commit")
        refs: list[m.SlotRef | None] = []
        for key in put.keys:
            slot = self._store.reserve(key, put.chunk_bytes, owner=owner, deadline_s=deadline_s)
            if isinstance(slot, Refusal):
                refs.append(None)
                continue
            self._reserved[(owner, key)] = slot
            refs.append(m.SlotRef(slot.region.segment_id, slot.region.offset))
        return m.PutReply(req=put.req, epoch=self._ring().epoch, slots=refs)

    def _store_inline(
        self, key: bytes, payload: Buffer, checksum: bytes, owner: str, deadline_s: float
    ) -> bool:
        if chunk_checksum(payload) != checksum:
            self.stats["put_checksum_mismatch"] += 1
            return False
        slot = self._store.reserve(key, len(payload), owner=owner, deadline_s=deadline_s)
        if isinstance(slot, Refusal):
            return False
        self._store.view(slot)[:] = memoryview(payload)
        return self._store.commit(key, checksum, owner=owner) is not None

    def _commit(self, identity: bytes, commit: m.Commit) -> int:
        """Publishes chunks a producer wrote into our reserved slots, if their bytes check out."""
        owner = f"put:{identity.hex()}"
        stored = 0
        for key, checksum in zip(commit.keys, commit.checksums, strict=True):
            slot = self._reserved.pop((owner, key), None)
            if slot is None:
                self.stats["commit_unknown"] += 1
            elif self._store.checksum(slot) != checksum:
                self.stats["commit_checksum_mismatch"] += 1
                self._store.abort(key, owner=owner)
            elif self._store.commit(key, checksum, owner=owner) is not None:
                stored += 1
        return stored

    def _expire(self) -> None:
        """Frees pins and reservations whose owners died or gave up."""
        for expired in self._store.expire(time.monotonic()):
            if expired.what == "reservation":
                self._reserved.pop((expired.owner, expired.key), None)
                self.stats["expired_reservations"] += 1
            else:
                self.stats["expired_pins"] += 1

    def _require_epoch(self, epoch: int) -> None:
        if not self._accept_any_epoch and not self._ring().accepts_epoch(epoch):
            raise ProtocolError("stale_epoch", str(epoch))


def _deadline_of(get: m.Get) -> float:
    """When to give up on ``get`` (monotonic clock); refuses it as expired if its requester
    already has: a get read late (this member was frozen, or its queue long) must not write
    into slots the requester may have reused since."""
    left_s = get.time_left_s(m.wall_clock_ms())
    if left_s <= 0:
        raise ProtocolError("expired", f"{-left_s:.3f} s past the requester's deadline")
    return time.monotonic() + left_s


def _regions(get: m.Get, slots: list[Slot]) -> list[Region]:
    """The bytes a get asks for: its pinned chunks whole, or the one piece it names (refused as
    "bad_range" if the piece is not inside the chunk)."""
    piece = get.piece()
    if piece is None:
        return [slot.region for slot in slots]
    try:
        return [slots[0].region.part(*piece)]
    except UsageError:
        raise ProtocolError("bad_range", f"{piece} of {slots[0].region.nbytes} bytes") from None
