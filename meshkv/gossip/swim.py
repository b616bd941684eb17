"""The SWIM + Lifeguard membership state machine: frames and a clock in, frames and events out.

One `Swim` is one member. Its driver feeds it received frames (`receive`) and the time (`tick`,
no later than `next_deadline_s`), sends what `take_outgoing` returns and publishes what
`take_events` returns. The parts, one mechanism each:

- `prober.Prober`: pings one member per interval, indirect pings, relays, verification pings;
- `table.MemberTable`: merges updates by precedence, suspicions (Lifeguard), events, forgetting;
- `outbox.Outbox`: frames out, with the least-sent queued updates piggybacked on each;
- here: inbound dispatch, refuting claims about this member, gossip fan-out while updates are
  queued, push-pull anti-entropy with a random member and with one held dead (so partitions
  heal), joining through seeds, leaving.

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
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent, Outgoing
from meshkv.gossip.member import (
    MemberInfo,
    MemberState,
    MemberView,
    MetaValue,
    check_meta,
    meta_bytes,
)
from meshkv.gossip.messages import (
    VERSION,
    Ack,
    Gossip,
    Message,
    MessageType,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateQuery,
    StateReply,
    decode_message,
    gossip_codec,
)
from meshkv.gossip.outbox import Outbox, Piggybacked
from meshkv.gossip.prober import Prober
from meshkv.gossip.table import LIVE, Member, MemberTable
from meshkv.gossip.updates import UPDATE_CACHE_ENTRIES, Alive, Dead, Update, UpdateCache
from meshkv.wire import FrameCodec, Protocol

log = logging.getLogger("vllm.meshkv.gossip.swim")

_INF = float("inf")
_LEAVE_FANOUT = 8  # members told at once of a graceful leave

_RX_KEYS = {kind: f"rx_{kind.name.lower()}" for kind in MessageType}
_EVENT_KEYS = {kind: f"event_{kind.value}" for kind in EventKind}


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
        self._out = Outbox(config, codec, self.stats)
        self._prober = Prober(config=config, me=self._me, table=self._table, out=self._out,
                              rng=rng, stats=self.stats, now_s=now_s)  # fmt: skip
        self._seeds: list[str] = []
        self._links_up: set[str] = set()  # bounded by the links the driver watches
        self._join_attempts = 0
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
        table = self._table
        deaths, suspects = table.expire(now, self._prober.verify_timeout_s(), self._links_up)
        self.stats["dead_declared"] += len(deaths)
        self.stats["death_held_link_up"] = table.deaths_held
        for dead in deaths:
            self._enqueue(dead)
        for suspect in suspects:
            self._prober.verify(suspect)
        alive = self._me.state is MemberState.ALIVE
        self._prober.tick(now, probing=alive)
        if alive:
            if now >= self._next_push_pull_s:
                self._push_pull(now)
            if now >= self._next_join_s:
                self._join_attempt()
        if now >= self._next_gossip_s and len(self._out.queue) and self.config.gossip_fanout:
            self._gossip(self.config.gossip_fanout)
            self._next_gossip_s = now + (self.config.gossip_interval_s or _INF)

    def next_deadline_s(self) -> float:
        """The earliest time `tick` must run again (inf when nothing is scheduled)."""
        alive = self._me.state is MemberState.ALIVE
        deadline = min(self._prober.next_deadline_s(probing=alive), self._table.next_deadline_s())
        if alive:
            deadline = min(deadline, self._next_push_pull_s, self._next_join_s)
        if len(self._out.queue) and self.config.gossip_fanout:
            deadline = min(deadline, self._next_gossip_s)
        return deadline

    def link_changed(self, address: str, up: bool) -> None:
        """The driver's word on the member at gossip ``address``: ``up`` while its process
        answers at the transport level without running its gossip loop (ZMQ heartbeats, answered
        by ZMQ's I/O thread, which needs no GIL), False once that stops (closed, killed, frozen,
        unreachable). A suspect whose link is up is held for up to ``stall_grace_s`` before it
        is declared dead: a busy engine can hold its GIL for seconds; a crashed or frozen one
        cannot answer heartbeats. The driver need only tell of `watched_addresses`; a driver
        that never calls it gets no stall grace: suspicions end by their timeout."""
        if up:
            self._links_up.add(address)
        else:
            self._links_up.discard(address)

    def watched_addresses(self) -> set[str]:
        """Where the driver should keep a link (`link_changed`): the suspects' addresses."""
        return self._table.suspect_addresses()

    def leave(self, now_s: float) -> None:
        """Announces a graceful leave to several members at once and stops probing; keep
        driving the member for a gossip interval or two so that the news spreads."""
        self._now = max(self._now, now_s)
        if self._me.state is MemberState.LEFT:
            return
        me = self._me
        me.state = MemberState.LEFT
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
        """Frames to send since the last call (see `Outgoing`)."""
        return self._out.take()

    def take_events(self) -> list[MemberEvent]:
        """Changes in other members since the last call (never about this member); each is
        counted as ``event_<kind>`` (how often members were seen suspected, dead...)."""
        events = self._table.take_events()
        for event in events:
            self.stats[_EVENT_KEYS[event.kind]] += 1
        return events

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
                self._prober.on_ack(message)
            case PingReq():
                if self._merge(message.updates):
                    self._correct(message.source)
                self._prober.on_ping_req(message, self._now)
            case Nack():
                self._prober.on_nack(message)
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
        self._out.send_state(reply_to, query.query_id, self._records())

    def _merge(self, updates: Sequence[Update]) -> bool:
        """Applies ``updates`` (whatever is news is gossiped on); True if one of them was a
        stale suspicion or death of this member (its sender missed our refutation)."""
        table, me, now = self._table, self._me.name, self._now
        stale = False
        for update in updates:
            if update.name == me:
                stale |= self._refute_if_needed(update)
                continue
            if table.apply(update, now):
                self._enqueue(update)
            if table.get(update.name) is not None:  # states only rise: it is spent here
                self._cache.settle(update)
        if table.full_drops:
            self.stats["drop_members_full"] += table.full_drops
            table.full_drops = 0
        return stale

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
        self._prober.health.apply(awareness.REFUTE_DELTA)
        self._enqueue(me.fresh_alive())
        return False

    def _correct(self, source: str) -> None:
        """Sends our current Alive to ``source``, which just told us a refuted suspicion."""
        member = self._table.get(source)
        if member is not None and member.state in LIVE:
            self.stats["correct_stale"] += 1
            self._send(member.address, Gossip(source=self._me.name, updates=(self._me.alive,)))

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

    def _send(self, address: str, message: Message) -> None:
        self._out.send(address, message)

    def _send_with_updates(
        self,
        address: str,
        message: Piggybacked,
        first: Update | None = None,
        *,
        require_updates: bool = False,
    ) -> bool:
        n_members = self._table.live_count + 1
        return self._out.send_with_updates(
            address, message, first, n_members=n_members, require_updates=require_updates
        )

    def _send_table(self, address: str, *, reply_wanted: bool) -> None:
        me = self._me
        self._out.send_table(address, self._records(), source=me.name,
                             source_address=me.address, reply_wanted=reply_wanted)  # fmt: skip

    def _records(self) -> list:
        return [self._me.record(), *self._table.records()]

    def _enqueue(self, update: Update) -> None:
        self._out.enqueue(update)
