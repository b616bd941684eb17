"""The failure detector: probe rounds, indirect probes, relays for others, last-chance pings.

Each probe interval (stretched by local health) the `Prober` pings the next member in shuffled
round robin; without an ack by ``probe_timeout_s`` it asks ``indirect_checks`` others to ping
it, and without any ack by the end of the interval it suspects it. It relays indirect pings for
others (a nack if the target stays silent) and sends the last direct pings that verify a
suspicion before it becomes a death. Successful probes and missed nacks feed local health.

This module knows nothing of sockets or clocks; it acts only through the member table and the
outbox it is given.
"""

from __future__ import annotations

import collections
import random

from meshkv.gossip import awareness
from meshkv.gossip.awareness import Awareness
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState
from meshkv.gossip.messages import MAX_SEQ, Ack, Nack, Ping, PingReq
from meshkv.gossip.outbox import Outbox
from meshkv.gossip.probe import ProbeRound, Relay, RelayTable
from meshkv.gossip.table import LIVE, Member, MemberTable
from meshkv.gossip.updates import Suspect

_VERIFY_PINGS = 2  # direct pings to a suspect before it is declared dead (each may be lost)
_LATE_PROBE_INTERVALS = 1.0  # passing a probe's end by this many intervals means we stalled


class Prober:
    """Probes one member per interval and relays probes for others."""

    def __init__(
        self,
        *,
        config: GossipConfig,
        me: Member,
        table: MemberTable,
        out: Outbox,
        rng: random.Random,
        stats: collections.Counter[str],
        now_s: float,
    ) -> None:
        self.config = config
        self.health = Awareness(config.awareness_max_multiplier)
        self._me = me
        self._table = table
        self._out = out
        self._stats = stats
        self._probe: ProbeRound | None = None
        self._relays = RelayTable(config.max_pending_relays)
        self._seq = rng.getrandbits(32)
        self._next_probe_s = now_s + rng.random() * config.probe_interval_s

    def tick(self, now_s: float, *, probing: bool) -> None:
        """Answers overdue relays with nacks and, if ``probing``, runs the probe round."""
        for relay in self._relays.pop_expired(now_s):
            self._out.send(relay.origin_address, Nack(seq=relay.origin_seq, source=self._me.name))
        if not probing:
            self._probe = None
            return
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now_s >= probe.direct_deadline_s:
            self._probe_indirectly(probe)
        if probe is not None and now_s >= probe.end_s:
            self._probe = None
            if now_s - probe.end_s > self.config.probe_interval_s * _LATE_PROBE_INTERVALS:
                self._stats["probe_late"] += 1  # we were stalled ourselves: no verdict
                self.health.apply(awareness.MISSED_NACK_DELTA)
                self._next_probe_s = now_s
            else:
                self._probe_failed(probe, now_s)
        if self._probe is None and now_s >= self._next_probe_s:
            self._start_probe(now_s)

    def next_deadline_s(self, *, probing: bool) -> float:
        deadline = self._relays.next_deadline_s()
        if probing:
            probe_s = self._probe.next_deadline_s() if self._probe else self._next_probe_s
            deadline = min(deadline, probe_s)
        return deadline

    def verify_timeout_s(self) -> float:
        """How long a last-chance ping waits for its answer."""
        return self.health.scale(self.config.probe_timeout_s)

    # ------------------------------------------------------------------ inbound

    def on_ack(self, ack: Ack) -> None:
        """An ack ends our probe, or is forwarded to whoever asked us to relay."""
        if self._probe is not None and ack.seq == self._probe.seq:
            self._probe = None
            self.health.apply(awareness.PROBE_OK_DELTA)
            self._stats["probe_ok"] += 1
            return
        relay = self._relays.pop(ack.seq)
        if relay is None:
            self._stats["ack_unmatched"] += 1
            return
        forwarded = Ack(seq=relay.origin_seq, source=self._me.name)
        self._out.send_with_updates(relay.origin_address, forwarded, n_members=self._n())

    def on_nack(self, nack: Nack) -> None:
        if self._probe is not None and nack.seq == self._probe.seq:
            self._probe.nacks += 1

    def on_ping_req(self, req: PingReq, now_s: float) -> None:
        """Pings ``req.target`` for its sender, if we have room for one more relay."""
        me = self._me
        if req.target == me.name or self._relays.full():
            self._stats["drop_relay_refused"] += 1
            return
        seq = self._next_seq()
        timeout_s = self.health.scale(self.config.probe_timeout_s)
        self._relays.add(seq, Relay(req.source_address, req.seq, now_s + timeout_s))
        ping = Ping(seq=seq, target=req.target, source=me.name, source_address=me.address)
        self._out.send_with_updates(req.target_address, ping, n_members=self._n())

    def verify(self, suspect: Member) -> None:
        """Last direct pings to a suspect whose suspicion ran out; they carry the suspicion,
        so a live suspect acks with its refutation. Unanswered, it is declared dead later."""
        me = self._me
        claim = Suspect(
            name=suspect.name, nonce=suspect.nonce, incarnation=suspect.incarnation, source=me.name
        )
        self._stats["verify"] += 1
        for _ in range(_VERIFY_PINGS):
            ping = Ping(seq=self._next_seq(), target=suspect.name, source=me.name,
                        source_address=me.address)  # fmt: skip
            self._out.send_with_updates(suspect.address, ping, claim, n_members=self._n())

    # ------------------------------------------------------------------ the probe round

    def _start_probe(self, now_s: float) -> None:
        interval_s = self.health.scale(self.config.probe_interval_s)
        self._next_probe_s = now_s + interval_s
        table = self._table
        name = table.order.next(table.names, table.is_live)
        if name is None:
            return
        target = table.get(name)
        assert target is not None
        timeout_s = self.health.scale(self.config.probe_timeout_s)
        self._probe = ProbeRound(
            target=name,
            nonce=target.nonce,
            seq=self._next_seq(),
            direct_deadline_s=now_s + timeout_s,
            end_s=now_s + interval_s,
        )
        self._stats["probe"] += 1
        me = self._me
        ping = Ping(seq=self._probe.seq, target=name, source=me.name, source_address=me.address)
        claim = None
        if target.state is MemberState.SUSPECT:  # tell it, so that it can refute
            claim = Suspect(
                name=name, nonce=target.nonce, incarnation=target.incarnation, source=me.name
            )
        self._out.send_with_updates(target.address, ping, claim, n_members=self._n())

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
            self._out.send_with_updates(relay.address, req, n_members=self._n())

    def _probe_failed(self, probe: ProbeRound, now_s: float) -> None:
        self._stats["probe_failed"] += 1
        missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self.health.apply(missed * awareness.MISSED_NACK_DELTA)
        target = self._table.get(probe.target)
        if target is None or target.nonce != probe.nonce or target.state not in LIVE:
            return
        suspect = Suspect(
            name=target.name,
            nonce=target.nonce,
            incarnation=target.incarnation,
            source=self._me.name,
        )
        if self._table.apply(suspect, now_s):
            self._stats["suspect_raised"] += 1
            self._out.enqueue(suspect)

    def _n(self) -> int:
        return self._table.live_count + 1

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_SEQ
        return self._seq
