"""The data-plane service core: decoded requests and a clock in; replies and writes out.

`DataService` answers one member's peers: hello, lookup, get, put, commit, held-at, chain-at. It
owns the
table of peers that greeted this member and the put reservations awaiting a commit; it reads
and pins the store and asks the byte path how a get's bytes travel. It has no sockets, no
threads and reads no clock: the driver (`meshkv.dataplane.server`) passes ``now`` in, sends the
replies, posts the writes and reports their outcome.

- `handle(peer, message, now_s, wall_ms=...)` -> a `Step`: replies to send now and writes to
  post. A reply's ``on_sent`` must run once it left (or was dropped): it unpins the chunks an
  inline reply's payloads borrow.
- `transfer_done(transfer, outcome)` -> the replies a finished (or abandoned) write releases;
  the driver calls it after releasing the transfer's handle, so nothing can still write.
- `expire(now_s)` -> the transfers past their deadline (the driver abandons them, then reports
  them "timeout"); every `DataPlaneConfig.expire_interval_s` it also frees expired pins and
  reservations.
- `forget_peer(name)`: a peer died, left or restarted.

Gets: a get names whole chunks or one piece of one chunk. It is given the time its requester
still waits, by the requester's clock (`messages.Get.time_left_s`); a get read after the
requester gave up (this member was frozen, or its queue long) is refused as expired, since the
requester may have reused the slots it named. On the NIXL path its chunks stay pinned until the
write ends; a transport that copies while it posts (UCX's cma) has then finished at once.

Lookups take the lean path: the request's keys as decoded (one packed field), one probe of the
store's leading run, one of the chain index (the entry of the lookup's first key, if this
member is its home) and, for what is left, one batched probe of the held-at directory; the
reply names a holder per run of keys, not per key (`chain_index.answer_lookup`).

Puts need agreement on the ring: one whose epoch is neither our current nor our previous one
is refused ("stale_epoch"). Held-at pointers are hints, taken whatever the epoch, and reads are
answered whatever the epoch: bytes are checked against the chunk checksum on arrival, so a
stale view can only cost a miss. A request the core refuses is answered with an `Error` naming
the reason and counted (``refused_<reason>``).

This module knows the data-plane messages, the store and the byte path; not sockets, NIXL
handles, gossip or threads.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from meshkv.dataplane import messages as m
from meshkv.dataplane.byte_path import BytePath, WriteOrder
from meshkv.dataplane.chain_index import answer_lookup
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.dataplane.handshake import answer_hello
from meshkv.errors import ProtocolError, UsageError
from meshkv.ring.view import RingView
from meshkv.store import ChunkStore, Refusal, Region, Slot, chunk_checksum
from meshkv.wire import Buffer, trusted

_RX_KEYS = {t: f"rx_{t.name.lower()}" for t in m.MessageType}
"""The requests-received counter of each message type (``rx_lookup``...), named once: an
enum member's name is a Python-level lookup, paid per request otherwise."""

TransferOutcome = Literal["done", "failed", "timeout", "stopped"]
"""How a posted write ended: completed; failed (or never started); past its deadline;
abandoned because the service is stopping."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A message for the peer whose socket identity is ``to``."""

    to: bytes
    message: m.Message
    on_sent: Callable[[], None] | None = None
    """Run once the reply was sent or dropped (frees what its payloads borrow)."""


@dataclass(slots=True)
class Step:
    """What one call into the core asks the driver to do, in order: send, then post."""

    replies: list[Reply] = field(default_factory=list)
    writes: list[WriteOrder] = field(default_factory=list)


@dataclass(slots=True)
class _PendingGet:
    peer: bytes
    req: int
    owner: str
    slots: list[Slot]
    deadline_s: float


class DataService:
    """Serves lookup/get/put/commit/held-at for one member (one thread calls it)."""

    def __init__(
        self,
        *,
        name: str,
        nonce: int,
        store: ChunkStore,
        path: BytePath,
        directory: HolderDirectory,
        ring: Callable[[], RingView],
        holder_alive: Callable[[str], bool],
        accept_any_epoch: bool = False,
        config: DataPlaneConfig | None = None,
    ) -> None:
        self._name = name
        self._nonce = nonce
        self._store = store
        self._path = path
        self._directory = directory
        self._ring = ring
        self._holder_alive = holder_alive
        self._accept_any_epoch = accept_any_epoch
        self._config = config or DataPlaneConfig()
        self._greeted: set[str] = set()  # members that said hello (since last forgotten)
        self._reserved: dict[tuple[str, bytes], Slot] = {}  # (owner, key) -> reserved slot
        self._pending: dict[int, _PendingGet] = {}  # transfer id -> get awaiting its write
        self._transfer_ids = itertools.count(1)
        self._next_sweep_s = 0.0
        self.stats: Counter[str] = Counter()
        """Requests by type, refusals by reason (the driver adds its drops and sends)."""

    @property
    def transfers_in_flight(self) -> int:
        return len(self._pending)

    def greeted(self, name: str) -> bool:
        """True if ``name`` has greeted this member (any boot of it) and is not forgotten."""
        return name in self._greeted

    # --- inputs -----------------------------------------------------------------------------

    def handle(self, peer: bytes, message: m.Message, now_s: float, *, wall_ms: int) -> Step:
        """Answers one decoded request from ``peer`` (a socket identity) at monotonic ``now_s``
        and wall-clock ``wall_ms``; refusals become `Error` replies, never exceptions."""
        self.stats[_RX_KEYS[message.TYPE]] += 1
        step = Step()
        try:
            self._dispatch(peer, message, now_s, wall_ms, step)
        except ProtocolError as exc:
            self.stats[f"refused_{exc.reason}"] += 1
            step.replies.append(Reply(peer, m.Error(req=message.req, reason=exc.reason)))
        return step

    def transfer_done(self, transfer: int, outcome: TransferOutcome) -> list[Reply]:
        """A posted write ended (its handle is released): unpins and answers its get."""
        get = self._pending.pop(transfer, None)
        if get is None:
            raise UsageError(f"transfer {transfer} is not in flight")
        if outcome == "failed":
            self.stats["get_transfer_failed"] += 1
        elif outcome == "timeout":
            self.stats["get_timeout"] += 1
        self._store.unpin(get.slots, owner=get.owner)
        sums = [slot.checksum for slot in get.slots] if outcome == "done" else []
        return [Reply(get.peer, m.GetReply(req=get.req, checksums=sums))]

    def expire(self, now_s: float) -> list[int]:
        """The transfers past their deadline at ``now_s`` (to abandon, then report "timeout");
        frees expired pins and reservations when a sweep is due."""
        if now_s >= self._next_sweep_s:
            self._sweep(now_s)
            self._next_sweep_s = now_s + self._config.expire_interval_s
        return [t for t, get in self._pending.items() if now_s >= get.deadline_s]

    def in_flight(self) -> list[int]:
        """Every transfer still in flight (to abandon when the service stops)."""
        return list(self._pending)

    def forget_peer(self, name: str) -> None:
        """A peer died, left or restarted: its next get must greet this member again."""
        self._greeted.discard(name)

    # --- handlers ---------------------------------------------------------------------------

    def _dispatch(
        self, peer: bytes, request: m.Message, now_s: float, wall_ms: int, step: Step
    ) -> None:
        match request:
            case m.Hello():
                reply = answer_hello(
                    self._path.channel, request, name=self._name, nonce=self._nonce
                )
                self._greeted.add(request.sender)
                step.replies.append(Reply(peer, reply))
            case m.Lookup():
                step.replies.append(Reply(peer, self.lookup_reply(request)))
            case m.Get():
                self._get(peer, request, now_s, wall_ms, step)
            case m.Put():
                step.replies.append(Reply(peer, self._put(peer, request, now_s)))
            case m.Commit():
                stored = self._commit(peer, request)
                step.replies.append(Reply(peer, m.CommitReply(req=request.req, stored=stored)))
            case m.HeldAt():  # a hint: whoever follows it checks the bytes, so any epoch
                self._directory.record(request.keys, request.holder)
            case m.ChainAt():  # a hint too, any epoch
                chains = self._directory.chains
                if not chains.record(request.head, request.start, request.keys, request.holder):
                    self.stats["chain_at_dropped"] += 1
            case _:
                raise ProtocolError("unexpected_type", request.TYPE.name)

    def lookup_reply(self, lookup: m.Lookup) -> m.LookupReply:
        """The answer to a lookup, by the lean path (module docstring): the reply is built from
        values already checked. Safe from any thread (the lookup port's): it reads only the
        store, the directory and the ring, each behind its own lock, and counts nothing."""
        keys = lookup.keys
        held = self._store.lookup_prefix(keys)
        pointers: list[str] = []
        runs: list[int] = []
        if held < len(keys):
            chained = self._directory.chains.holders(keys)
            pointers, runs = answer_lookup(
                self._name, keys, held, chained, self._directory.leading_holders,
                self._holder_alive, self._store.held_among,
            )  # fmt: skip
        return trusted(
            m.LookupReply,
            req=lookup.req, epoch=self._ring().epoch, held=held, pointers=pointers, runs=runs,
        )  # fmt: skip

    def _get(self, peer: bytes, get: m.Get, now_s: float, wall_ms: int, step: Step) -> None:
        owner = f"get:{peer.hex()}:{get.req}"
        left_s = get.time_left_s(wall_ms)
        if left_s <= 0:  # the requester gave up: it may have reused the slots it named
            raise ProtocolError("expired", f"{-left_s:.3f} s past the requester's deadline")
        deadline_s = now_s + left_s
        self._path.admit_get(get, greeted=get.sender in self._greeted)
        slots = self._store.pin(get.keys, owner=owner, deadline_s=deadline_s)
        if not slots:
            step.replies.append(Reply(peer, m.GetReply(req=get.req, checksums=[])))
            return
        try:
            regions = _regions(get, slots)
        except ProtocolError:
            self._store.unpin(slots, owner=owner)
            raise
        transfer = next(self._transfer_ids)
        served = self._path.serve_get(get, slots, regions, transfer=transfer)
        if isinstance(served, WriteOrder):
            self._pending[transfer] = _PendingGet(peer, get.req, owner, slots, deadline_s)
            step.writes.append(served)
        else:  # the bytes are in the reply: unpinned once it is sent
            unpin = self._unpinner(slots, owner)
            step.replies.append(Reply(peer, served, on_sent=unpin))

    def _unpinner(self, slots: list[Slot], owner: str) -> Callable[[], None]:
        def unpin() -> None:
            self._store.unpin(slots, owner=owner)

        return unpin

    def _put(self, peer: bytes, put: m.Put, now_s: float) -> m.Message:
        self._require_epoch(put.epoch)
        owner = f"put:{peer.hex()}"
        deadline_s = now_s + self._config.put_reservation_s
        if put.payloads:  # inline: the bytes are here
            stored = sum(
                self._store_inline(key, payload, checksum, owner, deadline_s)
                for key, payload, checksum in zip(
                    put.keys, put.payloads, put.checksums, strict=True
                )
            )
            return m.PutReply(req=put.req, epoch=self._ring().epoch, slots=[], stored=stored)
        if len(self._reserved) + len(put.keys) > self._config.reservations_max:
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

    def _commit(self, peer: bytes, commit: m.Commit) -> int:
        """Publishes chunks a producer wrote into our reserved slots, if their bytes check out."""
        owner = f"put:{peer.hex()}"
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

    def _sweep(self, now_s: float) -> None:
        """Frees pins and reservations whose owners died or gave up."""
        for expired in self._store.expire(now_s):
            if expired.what == "reservation":
                self._reserved.pop((expired.owner, expired.key), None)
                self.stats["expired_reservations"] += 1
            else:
                self.stats["expired_pins"] += 1

    def _require_epoch(self, epoch: int) -> None:
        if not self._accept_any_epoch and not self._ring().accepts_epoch(epoch):
            raise ProtocolError("stale_epoch", str(epoch))


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
