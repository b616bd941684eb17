"""The SWIM + Lifeguard membership state machine: frames and a clock in, frames and events out.

One `Swim` is one member. Its driver feeds it received frames (`receive`) and the time
(`tick` no later than `next_deadline_s`), sends what `take_outgoing` returns and publishes what
`take_events` returns. Each probe interval it pings one member (shuffled round robin), asks
``indirect_checks`` others to ping it if no ack comes within the probe timeout, and suspects it
if no ack comes by the end of the interval. A suspicion becomes a death after a Lifeguard
timeout that shrinks with independent confirmations; a suspected member refutes by raising its
incarnation. Updates piggyback on every packet (least-sent first) and are fanned out while any
are queued; periodic push-pull exchanges full tables with a random member and with a member
held dead (so partitions heal).

No sockets, threads or clocks here: time is the ``now_s`` the driver passes (any monotonic
seconds), randomness comes only from ``rng``. With an authenticating codec, the codec itself
reads wall time for its replay window. After a long gap (the process was stopped), a driver
should pass the frames that queued up to `receive` before calling `tick`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from heapq import heappop as heapq_pop
from heapq import heappush as heapq_push
from types import MappingProxyType
from typing import Any

from meshkv.errors import ProtocolError, UsageError
from meshkv.gossip import antientropy, awareness
from meshkv.gossip.awareness import Awareness
from meshkv.gossip.broadcast import BroadcastQueue, retransmit_limit
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent, Outgoing
from meshkv.gossip.member import (
    MemberInfo,
    MemberState,
    MemberView,
    MetaValue,
    Order,
    check_meta,
    meta_bytes,
    next_state,
    order_of,
)
from meshkv.gossip.messages import (
    MAX_SEQ,
    VERSION,
    Ack,
    Alive,
    Dead,
    Gossip,
    MemberRecord,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateQuery,
    StateReply,
    Suspect,
    Update,
    decode_message,
    encode_message,
    gossip_codec,
    wire_bytes,
)
from meshkv.gossip.probe import ProbeOrder, ProbeRound, Relay, RelayTable
from meshkv.gossip.suspicion import Suspicion, expected_confirmations, suspicion_min_timeout_s
from meshkv.wire import AUTH_TRAILER_BYTES, FrameCodec, Protocol

log = logging.getLogger("vllm.meshkv.gossip.swim")

_INF = float("inf")
_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
_LEAVE_FANOUT = 8  # members told at once of a graceful leave
_LIST_HEADER_BYTES = 5  # msgpack array header of the updates/records list, worst case
_LATE_PROBE_INTERVALS = 1.0  # a probe whose end we pass by this many intervals was our fault
_EVENT_OF = {
    MemberState.SUSPECT: EventKind.SUSPECT,
    MemberState.DEAD: EventKind.DEAD,
    MemberState.LEFT: EventKind.LEFT,
}


@dataclass(slots=True, kw_only=True)
class _Member:
    name: str
    nonce: int
    address: str
    incarnation: int
    state: MemberState
    meta: MappingProxyType[str, MetaValue]
    state_since_s: float
    suspicion: Suspicion | None = None

    def view(self) -> MemberView:
        return MemberView(
            name=self.name,
            nonce=self.nonce,
            address=self.address,
            state=self.state,
            incarnation=self.incarnation,
            meta=self.meta,
        )

    def record(self) -> MemberRecord:
        return MemberRecord(
            name=self.name,
            nonce=self.nonce,
            address=self.address,
            incarnation=self.incarnation,
            state=self.state,
            meta=self.meta,
        )

    def alive_update(self) -> Alive:
        return Alive(
            name=self.name,
            nonce=self.nonce,
            incarnation=self.incarnation,
            address=self.address,
            meta=self.meta,
        )


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
            raise UsageError("codec must be gossip_codec(config, auth): wrong protocol or version")
        if codec.max_frame_bytes != config.max_packet_bytes:
            raise UsageError("codec.max_frame_bytes must equal config.max_packet_bytes")
        self.config = config
        self.stats: collections.Counter[str] = collections.Counter()
        self._codec = codec
        self._rng = rng
        self._now = now_s
        self._frame_overhead = 5 + (AUTH_TRAILER_BYTES if codec.auth.enabled else 0)
        self._me = _Member(
            name=me.name,
            nonce=me.nonce,
            address=me.address,
            incarnation=incarnation_start,
            state=MemberState.ALIVE,
            meta=MappingProxyType(dict(me.meta)),
            state_since_s=now_s,
        )
        self._members: dict[str, _Member] = {}
        self._names: list[str] = []  # every other member, for O(1) random picks
        self._name_slot: dict[str, int] = {}
        self._live_others = 0
        self._queue = BroadcastQueue(config.max_broadcast_queue)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._order = ProbeOrder(rng)
        self._probe: ProbeRound | None = None
        self._relays = RelayTable(config.max_pending_relays)
        self._seq = rng.getrandbits(32)
        self._suspicions: list[tuple[float, int, str, Suspicion]] = []  # heap, lazily pruned
        self._heap_tiebreak = 0
        self._reap: collections.deque[tuple[float, str, int]] = collections.deque()
        self._outgoing: list[Outgoing] = []
        self._events: list[MemberEvent] = []
        self._seeds: list[str] = []
        self._join_attempts = 0
        self._left = False
        self._next_probe_s = now_s + rng.random() * config.probe_interval_s
        self._next_gossip_s = now_s
        self._next_push_pull_s = self._push_pull_due(now_s)
        self._next_join_s = _INF
        self._enqueue(self._me.alive_update())

    # ------------------------------------------------------------------ driver interface

    def join(self, seeds: Sequence[str], now_s: float) -> None:
        """Exchanges tables with every seed ("host:port"); retried until a member is known."""
        self._now = max(self._now, now_s)
        wanted = [s for s in dict.fromkeys(seeds) if s != self._me.address]
        self._seeds = wanted[: self.config.max_seeds]
        self._join_attempts = 0
        self._join_attempt()

    def receive(self, frame: bytes, now_s: float, reply_to: object | None = None) -> None:
        """Handles one frame; refused frames are counted as ``drop_<reason>``, never raised."""
        self._now = max(self._now, now_s)
        try:
            message = decode_message(self._codec, frame)
        except ProtocolError as exc:
            self.stats[f"drop_{exc.reason}"] += 1
            return
        self.stats["rx_ok"] += 1
        self.stats[f"rx_{message.TYPE.name.lower()}"] += 1
        self._handle(message, reply_to)

    def tick(self, now_s: float) -> None:
        """Runs every timer that is due: probes, relays, suspicions, gossip, push-pull, joins."""
        self._now = now = max(self._now, now_s)
        for relay in self._relays.pop_expired(now):
            self._send(relay.origin_address, Nack(seq=relay.origin_seq, source=self._me.name))
        self._expire_suspicions(now)
        if not self._left:
            self._run_probe(now)
            if now >= self._next_push_pull_s:
                self._push_pull(now)
            if now >= self._next_join_s:
                self._join_attempt()
        if now >= self._next_gossip_s and len(self._queue):
            self._gossip(self.config.gossip_fanout)
            self._next_gossip_s = now + (self.config.gossip_interval_s or _INF)
        self._reap_forgotten(now)

    def next_deadline_s(self) -> float:
        """The earliest time `tick` must run again (inf when nothing is scheduled)."""
        deadlines = [self._relays.next_deadline_s(), self._next_suspicion_s()]
        if not self._left:
            deadlines += [self._next_push_pull_s, self._next_join_s]
            deadlines.append(self._probe.next_deadline_s() if self._probe else self._next_probe_s)
        if len(self._queue) and self.config.gossip_fanout:
            deadlines.append(self._next_gossip_s)
        if self._reap:
            deadlines.append(self._reap[0][0])
        return min(deadlines)

    def leave(self, now_s: float) -> None:
        """Announces a graceful leave to several members at once, and stops probing."""
        self._now = max(self._now, now_s)
        if self._left:
            return
        self._left = True
        self._probe = None
        self._me.state = MemberState.LEFT
        me = self._me
        self._enqueue(
            Dead(
                name=me.name, nonce=me.nonce, incarnation=me.incarnation, source=me.name, left=True
            )
        )
        self._gossip(_LEAVE_FANOUT)

    def update_meta(self, meta: dict[str, MetaValue], now_s: float) -> None:
        """Replaces this member's metadata and gossips it under a new incarnation."""
        self._now = max(self._now, now_s)
        check_meta(dict(meta))
        if meta_bytes(meta) > self.config.max_meta_bytes:
            raise UsageError(f"meta exceeds max_meta_bytes={self.config.max_meta_bytes}")
        if self._left:
            raise UsageError("update_meta after leave")
        self._me.meta = MappingProxyType(dict(meta))
        self._me.incarnation += 1
        self._enqueue(self._me.alive_update())

    def take_outgoing(self) -> list[Outgoing]:
        out, self._outgoing = self._outgoing, []
        return out

    def take_events(self) -> list[MemberEvent]:
        events, self._events = self._events, []
        return events

    def members(self) -> list[MemberView]:
        """Every listed member, this one included, sorted by name."""
        views = [self._me.view()] + [m.view() for m in self._members.values()]
        return sorted(views, key=lambda v: v.name)

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    # ------------------------------------------------------------------ inbound messages

    def _handle(self, message: Message, reply_to: object | None) -> None:
        match message:
            case Ping():
                self._on_ping(message)
            case Ack():
                self._merge(message.updates)
                self._on_ack(message)
            case PingReq():
                self._merge(message.updates)
                self._on_ping_req(message)
            case Nack():
                if self._probe is not None and message.seq == self._probe.seq:
                    self._probe.nacks += 1
            case Gossip():
                self._merge(message.updates)
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
        self._merge(ping.updates)
        self._send_with_updates(ping.source_address, Ack(seq=ping.seq, source=self._me.name))

    def _on_ack(self, ack: Ack) -> None:
        probe = self._probe
        if probe is not None and ack.seq == probe.seq:
            self._probe = None
            self._awareness.apply(awareness.PROBE_OK_DELTA)
            self.stats["probe_ok"] += 1
            return
        relay = self._relays.pop(ack.seq)
        if relay is None:
            self.stats["ack_unmatched"] += 1
            return
        ack = Ack(seq=relay.origin_seq, source=self._me.name)
        self._send_with_updates(relay.origin_address, ack)

    def _on_ping_req(self, req: PingReq) -> None:
        if req.target == self._me.name or self._relays.full():
            self.stats["drop_relay_refused"] += 1
            return
        seq = self._next_seq()
        timeout_s = self._awareness.scale(self.config.probe_timeout_s)
        self._relays.add(seq, Relay(req.source_address, req.seq, self._now + timeout_s))
        ping = Ping(
            seq=seq, target=req.target, source=self._me.name, source_address=self._me.address
        )
        self._send_with_updates(req.target_address, ping)

    def _on_push_pull(self, message: PushPull) -> None:
        for record in message.records:
            self._merge(antientropy.updates_from_record(record, message.source))
        if message.reply_wanted:
            self._send_table(message.source_address, reply_wanted=False)

    def _on_state_query(self, query: StateQuery, reply_to: object | None) -> None:
        if reply_to is None:
            self.stats["drop_no_reply_to"] += 1
            return
        records = [self._me.record()] + [m.record() for m in self._members.values()]
        parts = antientropy.split_records(records, self._records_budget(StateReply))
        for index, part in enumerate(parts):
            reply = StateReply(
                query_id=query.query_id, part=index, parts=len(parts), records=tuple(part)
            )
            self._emit(Outgoing(None, encode_message(self._codec, reply), reply_to), reply)

    # ------------------------------------------------------------------ merging updates

    def _merge(self, updates: Sequence[Update]) -> None:
        for update in updates:
            if update.name == self._me.name:
                self._about_me(update)
            else:
                self._apply(update)

    def _apply(self, update: Update) -> None:
        held = self._members.get(update.name)
        kind = update.kind
        if held is None:
            order = Order.NEWER
        else:
            order = order_of(
                kind, (held.nonce, held.incarnation), (update.nonce, update.incarnation)
            )
        state = None if held is None else held.state
        target = next_state(update.name, state, kind, order)
        if target is None:
            return
        if held is None:
            assert isinstance(update, Alive)
            self._add_member(update)
        elif isinstance(update, Alive):
            self._revive(held, update)
        elif target is MemberState.SUSPECT:
            self._suspect(held, update, order)
        else:
            self._bury(held, update.incarnation, target)
            self._enqueue(update)

    def _add_member(self, update: Alive) -> None:
        if len(self._members) >= self.config.max_members:
            self.stats["drop_members_full"] += 1
            return
        member = _Member(
            name=update.name,
            nonce=update.nonce,
            address=update.address,
            incarnation=update.incarnation,
            state=MemberState.ALIVE,
            meta=MappingProxyType(dict(update.meta)),
            state_since_s=self._now,
        )
        self._members[member.name] = member
        self._name_slot[member.name] = len(self._names)
        self._names.append(member.name)
        self._live_others += 1
        self._order.add(member.name)
        self._publish(EventKind.JOINED, member)
        self._enqueue(update)

    def _revive(self, held: _Member, update: Alive) -> None:
        new_boot = update.nonce != held.nonce
        changed = held.address != update.address or dict(held.meta) != dict(update.meta)
        was = held.state
        held.nonce, held.incarnation, held.address = (
            update.nonce,
            update.incarnation,
            update.address,
        )
        held.meta = MappingProxyType(dict(update.meta))
        self._set_state(held, MemberState.ALIVE)
        if was not in _LIVE:
            self._order.add(held.name)
        if new_boot:
            self._publish(EventKind.JOINED, held)
        elif was is not MemberState.ALIVE:
            self._publish(EventKind.ALIVE, held)
        elif changed:
            self._publish(EventKind.UPDATED, held)
        self._enqueue(update)

    def _suspect(self, held: _Member, update: Suspect, order: Order) -> None:
        if held.state is MemberState.SUSPECT and order is Order.SAME:
            suspicion = held.suspicion
            if suspicion is not None and suspicion.confirm(update.source):
                self._schedule_suspicion(held.name, suspicion)
                self._enqueue(update)
            return
        was = held.state
        held.incarnation = update.incarnation
        self._set_state(held, MemberState.SUSPECT)
        if was not in _LIVE:
            self._order.add(held.name)
        n = self._live_others + 1
        min_s = suspicion_min_timeout_s(self.config.suspicion_mult, n, self.config.probe_interval_s)
        held.suspicion = Suspicion(
            start_s=self._now,
            min_s=min_s,
            max_s=min_s * self.config.suspicion_max_timeout_mult,
            k=expected_confirmations(self.config.suspicion_confirmations, n),
            first_source=update.source,
        )
        self._schedule_suspicion(held.name, held.suspicion)
        self._publish(EventKind.SUSPECT, held)
        self._enqueue(update)

    def _bury(self, held: _Member, incarnation: int, state: MemberState) -> None:
        was = held.state
        held.incarnation = incarnation
        self._set_state(held, state)
        if state is not was:
            self._publish(_EVENT_OF[state], held)
            self._reap.append((self._now + self.config.dead_retention_s, held.name, held.nonce))
            if state is MemberState.DEAD:
                log.info("member %s declared dead at incarnation %d", held.name, incarnation)

    def _set_state(self, member: _Member, state: MemberState) -> None:
        was_live, is_live = member.state in _LIVE, state in _LIVE
        self._live_others += is_live - was_live
        if state is not member.state:
            member.state_since_s = self._now
        member.state = state
        if state is not MemberState.SUSPECT:
            member.suspicion = None

    def _about_me(self, update: Update) -> None:
        me = self._me
        if self._left:
            return
        if isinstance(update, Alive) and update.nonce == me.nonce:
            if update.incarnation <= me.incarnation:
                return
        elif update.incarnation < me.incarnation:
            return  # an older claim, or about an older boot: our Alive outranks it
        if update.nonce != me.nonce:
            self.stats["name_conflict"] += 1
        self.stats["refute"] += 1
        me.incarnation = update.incarnation + 1
        self._awareness.apply(awareness.REFUTE_DELTA)
        self._enqueue(me.alive_update())

    def _publish(self, kind: EventKind, member: _Member) -> None:
        self._events.append(MemberEvent(kind=kind, member=member.view()))

    # ------------------------------------------------------------------ timers

    def _run_probe(self, now: float) -> None:
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.direct_deadline_s:
            self._probe_indirectly(probe)
        if probe is not None and now >= probe.end_s:
            self._probe = None
            late_s = self.config.probe_interval_s * _LATE_PROBE_INTERVALS
            if now - probe.end_s > late_s:  # we were stalled ourselves: no verdict on the target
                self.stats["probe_late"] += 1
                self._awareness.apply(awareness.MISSED_NACK_DELTA)
                self._next_probe_s = now
            else:
                self._probe_failed(probe)
        if self._probe is None and now >= self._next_probe_s:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        interval_s = self._awareness.scale(self.config.probe_interval_s)
        self._next_probe_s = now + interval_s
        name = self._order.next(lambda: self._names, self._is_live)
        if name is None:
            return
        target = self._members[name]
        timeout_s = self._awareness.scale(self.config.probe_timeout_s)
        self._probe = ProbeRound(
            target=name,
            nonce=target.nonce,
            seq=self._next_seq(),
            direct_deadline_s=now + timeout_s,
            end_s=now + interval_s,
        )
        self.stats["probe"] += 1
        ping = Ping(
            seq=self._probe.seq, target=name, source=self._me.name, source_address=self._me.address
        )
        first = None
        if target.state is MemberState.SUSPECT:  # let it know, so that it can refute
            first = Suspect(
                name=name, nonce=target.nonce, incarnation=target.incarnation, source=self._me.name
            )
        self._send_with_updates(target.address, ping, first)

    def _probe_indirectly(self, probe: ProbeRound) -> None:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None or target.nonce != probe.nonce:
            return
        relays = self._pick_members(
            self.config.indirect_checks, exclude=probe.target, alive_only=True
        )
        probe.expected_nacks = len(relays)
        for relay in relays:
            req = PingReq(
                seq=probe.seq,
                target=target.name,
                target_address=target.address,
                source=self._me.name,
                source_address=self._me.address,
            )
            self._send_with_updates(relay.address, req)

    def _probe_failed(self, probe: ProbeRound) -> None:
        self.stats["probe_failed"] += 1
        missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self._awareness.apply(missed * awareness.MISSED_NACK_DELTA)
        target = self._members.get(probe.target)
        if target is None or target.nonce != probe.nonce or target.state not in _LIVE:
            return
        self._apply(
            Suspect(
                name=target.name,
                nonce=target.nonce,
                incarnation=target.incarnation,
                source=self._me.name,
            )
        )

    def _expire_suspicions(self, now: float) -> None:
        heap = self._suspicions
        while heap and heap[0][0] <= now:
            deadline, _, name, suspicion = heapq_pop(heap)
            member = self._members.get(name)
            if member is None or member.suspicion is not suspicion:
                continue
            if suspicion.deadline_s != deadline:
                continue  # a newer entry carries the current deadline
            dead = Dead(
                name=name, nonce=member.nonce, incarnation=member.incarnation, source=self._me.name
            )
            self._apply(dead)

    def _schedule_suspicion(self, name: str, suspicion: Suspicion) -> None:
        self._heap_tiebreak += 1
        heapq_push(self._suspicions, (suspicion.deadline_s, self._heap_tiebreak, name, suspicion))

    def _next_suspicion_s(self) -> float:
        heap = self._suspicions
        while heap:
            deadline, _, name, suspicion = heap[0]
            member = self._members.get(name)
            if (
                member is not None
                and member.suspicion is suspicion
                and suspicion.deadline_s == deadline
            ):
                return deadline
            heapq_pop(heap)
        return _INF

    def _gossip(self, fanout: int) -> None:
        for member in self._pick_members(fanout, exclude=None, alive_only=False):
            gossip = Gossip(source=self._me.name, updates=())
            if not self._send_with_updates(member.address, gossip, require_updates=True):
                break

    def _push_pull(self, now: float) -> None:
        self._next_push_pull_s = self._push_pull_due(now)
        peers = self._pick_members(1, exclude=None, alive_only=True)
        if peers:
            self._send_table(peers[0].address, reply_wanted=True)
        elif self._seeds:
            self._send_join(self._seeds)
        dead = self._pick_dead()
        if dead is not None:  # reconnect: if it answers, it learns we hold it dead and refutes
            part = (self._me.record(), dead.record())
            self._send(
                dead.address,
                PushPull(
                    source=self._me.name,
                    source_address=self._me.address,
                    reply_wanted=True,
                    records=part,
                ),
            )

    def _push_pull_due(self, now: float) -> float:
        if not self.config.push_pull_interval_s:
            return _INF
        interval_s = antientropy.push_pull_interval_s(
            self.config.push_pull_interval_s, self._live_others + 1
        )
        return now + interval_s * (0.5 + self._rng.random())

    def _join_attempt(self) -> None:
        if self._live_others or self._join_attempts >= self.config.join_max_attempts:
            self._next_join_s = _INF
            return
        self._join_attempts += 1
        self.stats["join_attempt"] += 1
        self._send_join(self._seeds)
        self._next_join_s = self._now + self.config.join_retry_interval_s if self._seeds else _INF

    def _send_join(self, seeds: Sequence[str]) -> None:
        for seed in seeds:
            self._send(
                seed,
                PushPull(
                    source=self._me.name,
                    source_address=self._me.address,
                    reply_wanted=True,
                    records=(self._me.record(),),
                ),
            )

    def _reap_forgotten(self, now: float) -> None:
        while self._reap and self._reap[0][0] <= now:
            _, name, nonce = self._reap.popleft()
            member = self._members.get(name)
            retention_s = self.config.dead_retention_s
            if (
                member is None
                or member.nonce != nonce
                or member.state in _LIVE
                or member.state_since_s + retention_s > now
            ):
                continue
            del self._members[name]
            slot = self._name_slot.pop(name)
            last = self._names.pop()
            if last != name:
                self._names[slot] = last
                self._name_slot[last] = slot
            self.stats["reaped"] += 1

    # ------------------------------------------------------------------ outbound

    def _send_with_updates(
        self,
        address: str,
        message: Any,
        first: Update | None = None,
        *,
        require_updates: bool = False,
    ) -> bool:
        """Sends ``message`` with as many queued updates as fit; False if none fit and required."""
        base = wire_bytes([int(message.TYPE), message.to_fields()]) + self._frame_overhead
        budget = self.config.max_packet_bytes - base - _LIST_HEADER_BYTES
        updates: list[Update] = []
        if first is not None:
            updates.append(first)
            budget -= wire_bytes(first.to_wire())
        limit = retransmit_limit(self.config.retransmit_mult, self._live_others + 1)
        wanted = self.config.max_piggyback - len(updates)
        if wanted > 0 and budget > 0:
            updates += self._queue.take(budget, wanted, limit)
        if require_updates and not updates:
            return False
        self._send(address, dataclasses.replace(message, updates=tuple(updates)))
        return True

    def _send_table(self, address: str, *, reply_wanted: bool) -> None:
        records = [self._me.record()] + [m.record() for m in self._members.values()]
        parts = antientropy.split_records(records, self._records_budget(PushPull))
        for index, part in enumerate(parts):
            self._send(
                address,
                PushPull(
                    source=self._me.name,
                    source_address=self._me.address,
                    reply_wanted=reply_wanted and index == len(parts) - 1,
                    records=tuple(part),
                ),
            )

    def _records_budget(self, kind: type) -> int:
        if kind is PushPull:
            probe = PushPull(
                source=self._me.name, source_address=self._me.address, reply_wanted=True, records=()
            )
        else:
            probe = StateReply(query_id=MAX_SEQ, part=0, parts=1, records=())
        base = wire_bytes([int(probe.TYPE), probe.to_fields()]) + self._frame_overhead
        return self.config.max_packet_bytes - base - _LIST_HEADER_BYTES - 16  # ints may grow

    def _send(self, address: str, message: Message) -> None:
        self._emit(Outgoing(address, encode_message(self._codec, message)), message)

    def _emit(self, outgoing: Outgoing, message: Message) -> None:
        self._outgoing.append(outgoing)
        self.stats["tx"] += 1
        self.stats[f"tx_{message.TYPE.name.lower()}"] += 1

    def _enqueue(self, update: Update) -> None:
        self._queue.put(update.name, update, wire_bytes(update.to_wire()))

    # ------------------------------------------------------------------ helpers

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_SEQ
        return self._seq

    def _is_live(self, name: str) -> bool:
        member = self._members.get(name)
        return member is not None and member.state in _LIVE

    def _pick_members(self, count: int, *, exclude: str | None, alive_only: bool) -> list[_Member]:
        """Up to ``count`` distinct random live members (ALIVE only if ``alive_only``)."""
        if count <= 0 or not self._live_others:
            return []
        wanted = (MemberState.ALIVE,) if alive_only else _LIVE
        names, picked, seen = self._names, [], set()
        for _ in range(4 * count + 8):  # random probing first: cheap when most are live
            name = names[self._rng.randrange(len(names))]
            member = self._members[name]
            if name not in seen and name != exclude and member.state in wanted:
                seen.add(name)
                picked.append(member)
                if len(picked) == count:
                    return picked
        pool = [
            self._members[n] for n in names if n != exclude and self._members[n].state in wanted
        ]
        return self._rng.sample(pool, min(count, len(pool)))

    def _pick_dead(self) -> _Member | None:
        dead = [(n, nonce) for _, n, nonce in self._reap]
        for _ in range(4):
            if not dead:
                return None
            name, nonce = dead[self._rng.randrange(len(dead))]
            member = self._members.get(name)
            if member is not None and member.nonce == nonce and member.state is MemberState.DEAD:
                return member
        return None
