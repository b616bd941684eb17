"""The SWIM + Lifeguard membership state machine: frames and a clock in, frames and events out.

One `Swim` is one member. Its driver feeds it received frames (`receive`) and the time (`tick`,
no later than `next_deadline_s`), sends what `take_outgoing` returns and publishes what
`take_events` returns. Each probe interval this member pings one other (shuffled round robin),
asks ``indirect_checks`` others to ping it if no ack comes within the probe timeout, and
suspects it if no ack comes by the end of the interval. A suspicion becomes a death after a
Lifeguard timeout that shrinks with independent confirmations (see `table`); a suspected member
refutes by raising its incarnation. Updates piggyback on every packet, least-sent first, and are
fanned out while any are queued; a periodic push-pull exchanges whole tables with a random
member and pokes one member held dead, which is how partitions heal.

No sockets, threads or clocks here: time is the ``now_s`` the driver passes (any monotonic
seconds), randomness comes only from ``rng``. With an authenticating codec, the codec itself
reads wall time for its replay window. After a long gap (the process was stopped), a driver
should pass the frames that queued up to `receive` before it calls `tick`.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Sequence
from types import MappingProxyType

from meshkv.errors import ProtocolError, UsageError
from meshkv.gossip import antientropy, awareness
from meshkv.gossip.awareness import Awareness
from meshkv.gossip.broadcast import BroadcastQueue, retransmit_limit
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import MemberEvent, Outgoing
from meshkv.gossip.member import (
    MemberInfo,
    MemberState,
    MemberView,
    MetaValue,
    check_meta,
    meta_bytes,
)
from meshkv.gossip.messages import (
    MAX_SEQ,
    UPDATE_CACHE_ENTRIES,
    VERSION,
    Ack,
    Alive,
    Dead,
    Gossip,
    Message,
    MessageType,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateQuery,
    StateReply,
    Suspect,
    Update,
    UpdateCache,
    decode_message,
    encode_message,
    gossip_codec,
    packed_bytes,
    wire_bytes,
)
from meshkv.gossip.probe import ProbeRound, Relay, RelayTable
from meshkv.gossip.table import LIVE, Member, MemberTable
from meshkv.wire import AUTH_TRAILER_BYTES, FrameCodec, Protocol

log = logging.getLogger("vllm.meshkv.gossip.swim")

_INF = float("inf")
_LEAVE_FANOUT = 8  # members told at once of a graceful leave
_VERIFY_PINGS = 2  # direct pings to a suspect before it is declared dead (each may be lost)
_LIST_HEADER_BYTES = 5  # msgpack array header of an updates or records list, worst case
_INT_GROWTH_BYTES = 16  # room for integer fields that encode longer than the size probe's
_LATE_PROBE_INTERVALS = 1.0  # passing a probe's end by this many intervals means we stalled

_RX_KEYS = {kind: f"rx_{kind.name.lower()}" for kind in MessageType}
_TX_KEYS = {kind: f"tx_{kind.name.lower()}" for kind in MessageType}

Piggybacked = Ping | Ack | PingReq | Gossip


class Swim:
    """One member of the gossip mesh, as a pure state machine (see the module docstring)."""

    def __init__(
        self,
        *,
        config: GossipConfig,
        me: MemberInfo,
        incarnation_start: int,
        rng: random.Random,
        now_s: float,
        codec: FrameCodec | None = None,
    ) -> None:
        if meta_bytes(me.meta) > config.max_meta_bytes:
            raise UsageError(f"meta of {me.name} exceeds max_meta_bytes={config.max_meta_bytes}")
        codec = codec or gossip_codec(config)
        if codec.protocol != Protocol.GOSSIP or codec.version != VERSION:
            raise UsageError("codec must come from gossip_codec(): wrong protocol or version")
        if codec.max_frame_bytes != config.max_packet_bytes:
            raise UsageError("codec.max_frame_bytes must equal config.max_packet_bytes")
        self.config = config
        self.stats: collections.Counter[str] = collections.Counter()
        self._codec = codec
        self._cache = UpdateCache(UPDATE_CACHE_ENTRIES)
        self._rng = rng
        self._now = now_s
        self._frame_overhead = 5 + (AUTH_TRAILER_BYTES if codec.auth.enabled else 0)
        self._me = Member(
            name=me.name,
            nonce=me.nonce,
            address=me.address,
            incarnation=incarnation_start,
            state=MemberState.ALIVE,
            meta=MappingProxyType(dict(me.meta)),
            state_since_s=now_s,
            alive=Alive(name=me.name, nonce=me.nonce, incarnation=incarnation_start,
                        address=me.address, meta=me.meta),
        )  # fmt: skip
        self._table = MemberTable(config, me.name, rng)
        self._queue = BroadcastQueue(config.max_broadcast_queue)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._probe: ProbeRound | None = None
        self._relays = RelayTable(config.max_pending_relays)
        self._seq = rng.getrandbits(32)
        self._outgoing: list[Outgoing] = []
        self._seeds: list[str] = []
        self._join_attempts = 0
        self._next_probe_s = now_s + rng.random() * config.probe_interval_s
        self._next_gossip_s = now_s
        self._next_push_pull_s = self._push_pull_due(now_s)
        self._next_join_s = _INF
        self._enqueue(self._me.fresh_alive())

    # ------------------------------------------------------------------ driver interface

    def join(self, seeds: Sequence[str], now_s: float) -> None:
        """Exchanges tables with a seed ("host:port"), one seed per attempt in shuffled order,
        every ``join_retry_interval_s`` until some member is known or ``join_max_attempts``
        is spent; afterwards seeds are retried at the push-pull interval while none is known.
        (One seed at a time: each answer is a whole table, and one is enough.)"""
        self._now = max(self._now, now_s)
        wanted = [s for s in dict.fromkeys(seeds) if s != self._me.address]
        self._seeds = wanted[: self.config.max_seeds]
        self._rng.shuffle(self._seeds)
        self._join_attempts = 0
        self._join_attempt()

    def receive(self, frame: bytes, now_s: float, reply_to: object | None = None) -> None:
        """Handles one frame; refused frames are counted as ``drop_<reason>``, never raised."""
        self._now = max(self._now, now_s)
        try:
            message = decode_message(self._codec, frame, self._cache)
        except ProtocolError as exc:
            self.stats[f"drop_{exc.reason}"] += 1
            return
        self.stats["rx_ok"] += 1
        self.stats[_RX_KEYS[message.TYPE]] += 1
        self._handle(message, reply_to)

    def tick(self, now_s: float) -> None:
        """Runs every timer that is due: relays, suspicions, probes, push-pull, joins, gossip."""
        self._now = now = max(self._now, now_s)
        for relay in self._relays.pop_expired(now):
            self._send(relay.origin_address, Nack(seq=relay.origin_seq, source=self._me.name))
        verify_s = self._awareness.scale(self.config.probe_timeout_s)
        deaths, suspects = self._table.expire(now, verify_s)
        for dead in deaths:
            self._enqueue(dead)
        for suspect in suspects:
            self._verify(suspect)
        if self._me.state is MemberState.ALIVE:
            self._run_probe(now)
            if now >= self._next_push_pull_s:
                self._push_pull(now)
            if now >= self._next_join_s:
                self._join_attempt()
        if now >= self._next_gossip_s and len(self._queue) and self.config.gossip_fanout:
            self._gossip(self.config.gossip_fanout)
            self._next_gossip_s = now + (self.config.gossip_interval_s or _INF)

    def next_deadline_s(self) -> float:
        """The earliest time `tick` must run again (inf when nothing is scheduled)."""
        deadline = min(self._relays.next_deadline_s(), self._table.next_deadline_s())
        if self._me.state is MemberState.ALIVE:
            probe_s = self._probe.next_deadline_s() if self._probe else self._next_probe_s
            deadline = min(deadline, probe_s, self._next_push_pull_s, self._next_join_s)
        if len(self._queue) and self.config.gossip_fanout:
            deadline = min(deadline, self._next_gossip_s)
        return deadline

    def leave(self, now_s: float) -> None:
        """Announces a graceful leave to several members at once and stops probing; keep
        driving the member for a gossip interval or two so that the news spreads."""
        self._now = max(self._now, now_s)
        if self._me.state is MemberState.LEFT:
            return
        me = self._me
        me.state = MemberState.LEFT
        self._probe = None
        left = Dead(
            name=me.name, nonce=me.nonce, incarnation=me.incarnation, source=me.name, left=True
        )
        self._enqueue(left)
        for member in self._table.pick(_LEAVE_FANOUT, alive_only=False):
            self._send(member.address, Gossip(source=me.name, updates=(left,)))

    def update_meta(self, meta: dict[str, MetaValue], now_s: float) -> None:
        """Replaces this member's metadata and gossips it under a new incarnation."""
        self._now = max(self._now, now_s)
        check_meta(dict(meta))
        if meta_bytes(meta) > self.config.max_meta_bytes:
            raise UsageError(f"meta exceeds max_meta_bytes={self.config.max_meta_bytes}")
        if self._me.state is MemberState.LEFT:
            raise UsageError("update_meta after leave")
        self._me.meta = MappingProxyType(dict(meta))
        self._me.incarnation += 1
        self._enqueue(self._me.fresh_alive())

    def take_outgoing(self) -> list[Outgoing]:
        out, self._outgoing = self._outgoing, []
        return out

    def take_events(self) -> list[MemberEvent]:
        """Changes in other members since the last call (never about this member)."""
        return self._table.take_events()

    def members(self) -> list[MemberView]:
        """Every listed member, this one included, sorted by name."""
        return sorted([self._me.view(), *self._table.views()], key=lambda view: view.name)

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    # ------------------------------------------------------------------ inbound messages

    def _handle(self, message: Message, reply_to: object | None) -> None:
        match message:
            case Ping():
                self._on_ping(message)
            case Ack():
                if self._merge(message.updates):
                    self._correct(message.source)
                self._on_ack(message)
            case PingReq():
                if self._merge(message.updates):
                    self._correct(message.source)
                self._on_ping_req(message)
            case Nack():
                if self._probe is not None and message.seq == self._probe.seq:
                    self._probe.nacks += 1
            case Gossip():
                if self._merge(message.updates):
                    self._correct(message.source)
            case PushPull():
                self._on_push_pull(message)
            case StateQuery():
                self._on_state_query(message, reply_to)
            case StateReply():
                self.stats["drop_unexpected"] += 1

    def _on_ping(self, ping: Ping) -> None:
        if ping.target != self._me.name:
            self.stats["drop_wrong_target"] += 1
            return
        stale = self._merge(ping.updates)  # then the ack carries our refutation
        ack = Ack(seq=ping.seq, source=self._me.name)
        self._send_with_updates(ping.source_address, ack, self._me.alive if stale else None)

    def _on_ack(self, ack: Ack) -> None:
        if self._probe is not None and ack.seq == self._probe.seq:
            self._probe = None
            self._awareness.apply(awareness.PROBE_OK_DELTA)
            self.stats["probe_ok"] += 1
            return
        relay = self._relays.pop(ack.seq)
        if relay is None:
            self.stats["ack_unmatched"] += 1
            return
        forwarded = Ack(seq=relay.origin_seq, source=self._me.name)
        self._send_with_updates(relay.origin_address, forwarded)

    def _on_ping_req(self, req: PingReq) -> None:
        if req.target == self._me.name or self._relays.full():
            self.stats["drop_relay_refused"] += 1
            return
        seq = self._next_seq()
        timeout_s = self._awareness.scale(self.config.probe_timeout_s)
        self._relays.add(seq, Relay(req.source_address, req.seq, self._now + timeout_s))
        me = self._me
        ping = Ping(seq=seq, target=req.target, source=me.name, source_address=me.address)
        self._send_with_updates(req.target_address, ping)

    def _on_push_pull(self, message: PushPull) -> None:
        for record in message.records:
            self._merge(antientropy.updates_from_record(record, message.source))
        if message.reply_wanted:
            self._send_table(message.source_address, reply_wanted=False)
        elif self._next_push_pull_s < _INF:  # an answer: tables were just exchanged
            self._next_push_pull_s = max(self._next_push_pull_s, self._push_pull_due(self._now))

    def _on_state_query(self, query: StateQuery, reply_to: object | None) -> None:
        if reply_to is None:
            self.stats["drop_no_reply_to"] += 1
            return
        records = [self._me.record(), *self._table.records()]
        parts = antientropy.split_records(records, self._records_budget(StateReply))
        for index, part in enumerate(parts):
            reply = StateReply(
                query_id=query.query_id, part=index, parts=len(parts), records=tuple(part)
            )
            self._emit(Outgoing(None, encode_message(self._codec, reply), reply_to), reply)

    def _merge(self, updates: Sequence[Update]) -> bool:
        """Applies ``updates`` (whatever is news is gossiped on); True if one of them was a
        stale suspicion or death of this member (its sender missed our refutation)."""
        table, me, now = self._table, self._me.name, self._now
        stale = False
        for update in updates:
            if update.name == me:
                stale |= self._refute_if_needed(update)
            elif table.apply(update, now):
                self._enqueue(update)
        return stale
        if self._table.full_drops:
            self.stats["drop_members_full"] += self._table.full_drops
            self._table.full_drops = 0

    def _refute_if_needed(self, update: Update) -> bool:
        """Outranks any claim about this member that would otherwise win (Lifeguard refute);
        True if ``update`` is a suspicion or death this member already refuted."""
        me = self._me
        if me.state is MemberState.LEFT:
            return False
        if isinstance(update, Alive) and update.nonce == me.nonce:
            if update.incarnation <= me.incarnation:
                return False
        elif update.incarnation < me.incarnation:
            # an older claim, or one about an older boot: our Alive outranks it
            return update.nonce == me.nonce and not isinstance(update, Alive)
        if update.nonce != me.nonce:
            self.stats["name_conflict"] += 1
            log.warning("another boot of %s is gossiped (nonce %x)", me.name, update.nonce)
        self.stats["refute"] += 1
        me.incarnation = update.incarnation + 1
        self._awareness.apply(awareness.REFUTE_DELTA)
        self._enqueue(me.fresh_alive())
        return False

    def _correct(self, source: str) -> None:
        """Sends our current Alive to ``source``, which just told us a refuted suspicion."""
        member = self._table.get(source)
        if member is not None and member.state in LIVE:
            self.stats["correct_stale"] += 1
            self._send(member.address, Gossip(source=self._me.name, updates=(self._me.alive,)))

    # ------------------------------------------------------------------ probing

    def _run_probe(self, now: float) -> None:
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.direct_deadline_s:
            self._probe_indirectly(probe)
        if probe is not None and now >= probe.end_s:
            self._probe = None
            if now - probe.end_s > self.config.probe_interval_s * _LATE_PROBE_INTERVALS:
                self.stats["probe_late"] += 1  # we were stalled ourselves: no verdict
                self._awareness.apply(awareness.MISSED_NACK_DELTA)
                self._next_probe_s = now
            else:
                self._probe_failed(probe)
        if self._probe is None and now >= self._next_probe_s:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        interval_s = self._awareness.scale(self.config.probe_interval_s)
        self._next_probe_s = now + interval_s
        table = self._table
        name = table.order.next(table.names, table.is_live)
        if name is None:
            return
        target = table.get(name)
        assert target is not None
        timeout_s = self._awareness.scale(self.config.probe_timeout_s)
        self._probe = ProbeRound(
            target=name,
            nonce=target.nonce,
            seq=self._next_seq(),
            direct_deadline_s=now + timeout_s,
            end_s=now + interval_s,
        )
        self.stats["probe"] += 1
        me = self._me
        ping = Ping(seq=self._probe.seq, target=name, source=me.name, source_address=me.address)
        first = None
        if target.state is MemberState.SUSPECT:  # tell it, so that it can refute
            first = Suspect(
                name=name, nonce=target.nonce, incarnation=target.incarnation, source=me.name
            )
        self._send_with_updates(target.address, ping, first)

    def _probe_indirectly(self, probe: ProbeRound) -> None:
        probe.indirect_sent = True
        target = self._table.get(probe.target)
        if target is None or target.nonce != probe.nonce:
            return
        relays = self._table.pick(self.config.indirect_checks, exclude=target.name, alive_only=True)
        probe.expected_nacks = len(relays)
        me = self._me
        for relay in relays:
            req = PingReq(
                seq=probe.seq,
                target=target.name,
                target_address=target.address,
                source=me.name,
                source_address=me.address,
            )
            self._send_with_updates(relay.address, req)

    def _probe_failed(self, probe: ProbeRound) -> None:
        self.stats["probe_failed"] += 1
        missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self._awareness.apply(missed * awareness.MISSED_NACK_DELTA)
        target = self._table.get(probe.target)
        if target is None or target.nonce != probe.nonce or target.state not in LIVE:
            return
        suspect = Suspect(
            name=target.name,
            nonce=target.nonce,
            incarnation=target.incarnation,
            source=self._me.name,
        )
        if self._table.apply(suspect, self._now):
            self._enqueue(suspect)

    def _verify(self, suspect: Member) -> None:
        """Last direct pings to a suspect whose suspicion ran out; they carry the suspicion,
        so a live suspect acks with its refutation. Unanswered, it is declared dead later."""
        me = self._me
        claim = Suspect(
            name=suspect.name, nonce=suspect.nonce, incarnation=suspect.incarnation, source=me.name
        )
        self.stats["verify"] += 1
        for _ in range(_VERIFY_PINGS):
            ping = Ping(seq=self._next_seq(), target=suspect.name, source=me.name,
                        source_address=me.address)  # fmt: skip
            self._send_with_updates(suspect.address, ping, claim)

    # ------------------------------------------------------------------ dissemination

    def _gossip(self, fanout: int) -> None:
        for member in self._table.pick(fanout, alive_only=False):
            gossip = Gossip(source=self._me.name, updates=())
            if not self._send_with_updates(member.address, gossip, require_updates=True):
                return

    def _push_pull(self, now: float) -> None:
        self._next_push_pull_s = self._push_pull_due(now)
        peers = self._table.pick(1, alive_only=True)
        if peers:
            self._send_table(peers[0].address, reply_wanted=True)
        elif self._seeds:
            self._send_join(self._rng.choice(self._seeds))
        dead = self._table.pick_dead()
        if dead is not None:  # if it answers, it learns we hold it dead and refutes
            me = self._me
            records = (me.record(), dead.record())
            self._send(
                dead.address,
                PushPull(
                    source=me.name,
                    source_address=me.address,
                    reply_wanted=True,
                    records=records,
                ),
            )

    def _push_pull_due(self, now: float) -> float:
        if not self.config.push_pull_interval_s:
            return _INF
        n = self._table.live_count + 1
        interval_s = antientropy.push_pull_interval_s(self.config.push_pull_interval_s, n)
        return now + interval_s * (0.5 + self._rng.random())  # jittered: no lockstep

    def _join_attempt(self) -> None:
        if self._table.live_count or self._join_attempts >= self.config.join_max_attempts:
            self._next_join_s = _INF
            return
        self._join_attempts += 1
        self.stats["join_attempt"] += 1
        if self._seeds:
            self._send_join(self._seeds[(self._join_attempts - 1) % len(self._seeds)])
        self._next_join_s = self._now + self.config.join_retry_interval_s if self._seeds else _INF

    def _send_join(self, seed: str) -> None:
        me = self._me
        join = PushPull(
            source=me.name, source_address=me.address, reply_wanted=True, records=(me.record(),)
        )
        self._send(seed, join)

    # ------------------------------------------------------------------ outbound

    def _send_with_updates(
        self,
        address: str,
        message: Piggybacked,
        first: Update | None = None,
        *,
        require_updates: bool = False,
    ) -> bool:
        """Sends ``message`` with as many queued updates as fit; False if none did and
        ``require_updates``."""
        fields = message.to_fields()  # validated once, without updates
        base = wire_bytes([int(message.TYPE), fields]) + self._frame_overhead
        budget = self.config.max_packet_bytes - base - _LIST_HEADER_BYTES
        updates: list[Update] = [] if first is None else [first]
        if first is not None:
            budget -= packed_bytes(first)
        limit = retransmit_limit(self.config.retransmit_mult, self._table.live_count + 1)
        wanted = self.config.max_piggyback - len(updates)
        if wanted > 0 and budget > 0:
            updates += self._queue.take(budget, wanted, limit)
        if require_updates and not updates:
            return False
        fields["updates"] = [update.packed() for update in updates]
        self._outgoing.append(Outgoing(address, self._codec.encode(message.TYPE, fields)))
        self._count_tx(message.TYPE)
        return True

    def _send_table(self, address: str, *, reply_wanted: bool) -> None:
        me = self._me
        records = [me.record(), *self._table.records()]
        parts = antientropy.split_records(records, self._records_budget(PushPull))
        for index, part in enumerate(parts):
            wants = reply_wanted and index == len(parts) - 1
            self._send(
                address,
                PushPull(
                    source=me.name,
                    source_address=me.address,
                    reply_wanted=wants,
                    records=tuple(part),
                ),
            )

    def _records_budget(self, kind: type[PushPull] | type[StateReply]) -> int:
        """Bytes left for records in one frame of ``kind``."""
        empty: PushPull | StateReply
        if kind is PushPull:
            me = self._me
            empty = PushPull(
                source=me.name, source_address=me.address, reply_wanted=True, records=()
            )
        else:
            empty = StateReply(query_id=MAX_SEQ, part=0, parts=1, records=())
        base = wire_bytes([int(empty.TYPE), empty.to_fields()]) + self._frame_overhead
        return self.config.max_packet_bytes - base - _LIST_HEADER_BYTES - _INT_GROWTH_BYTES

    def _send(self, address: str, message: Message) -> None:
        self._emit(Outgoing(address, encode_message(self._codec, message)), message)

    def _emit(self, outgoing: Outgoing, message: Message) -> None:
        self._outgoing.append(outgoing)
        self._count_tx(message.TYPE)

    def _count_tx(self, message_type: MessageType) -> None:
        self.stats["tx"] += 1
        self.stats[_TX_KEYS[message_type]] += 1

    def _enqueue(self, update: Update) -> None:
        self._queue.put(update.name, update, packed_bytes(update))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_SEQ
        return self._seq
