"""The member table: every other member as this member sees it, changed only by updates.

`MemberTable.apply` merges one update through the precedence table (`member.next_state`),
starts, confirms and ends Lifeguard suspicions, publishes member events, keeps the probe order in
step, and remembers dead and left members for ``dead_retention_s`` before forgetting them. It
answers whether the update was news (so the caller gossips it on). Random picks of members
(probe relays, gossip targets, push-pull peers) are O(1) on average.

This module knows nothing of messages on the wire, the network, or this member's own record.
"""

from __future__ import annotations

import collections
import heapq
import logging
import random
from collections.abc import Mapping, Set
from dataclasses import dataclass
from types import MappingProxyType

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.member import MemberState, MemberView, MetaValue, Order, next_state, order_of
from meshkv.gossip.messages import MemberRecord
from meshkv.gossip.probe import ProbeOrder
from meshkv.gossip.suspicion import Suspicion, expected_confirmations, suspicion_min_timeout_s
from meshkv.gossip.updates import Alive, Dead, Suspect, Update
from meshkv.wire import trusted

log = logging.getLogger("vllm.meshkv.gossip.table")

LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
_INF = float("inf")
_EVENT_OF = {
    MemberState.SUSPECT: EventKind.SUSPECT,
    MemberState.DEAD: EventKind.DEAD,
    MemberState.LEFT: EventKind.LEFT,
}
_RANDOM_TRIES_PER_PICK = 4  # random draws per wanted member before falling back to a scan


@dataclass(slots=True, kw_only=True)
class Member:
    """One member's record; mutable, owned by its table (or by `Swim` for itself)."""

    name: str
    nonce: int
    address: str
    incarnation: int
    state: MemberState
    meta: MappingProxyType[str, MetaValue]
    state_since_s: float
    alive: Alive  # the latest Alive applied: address and metadata as gossip carries them
    suspicion: Suspicion | None = None
    last_update: Update | None = None  # the last update applied: receiving it again is no news
    _record: MemberRecord | None = None
    _record_key: tuple[object, ...] | None = None

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
        """This member's record (made again only after the member changed)."""
        key = (self.nonce, self.incarnation, self.state, self.alive)
        if self._record_key != key:
            self._record = trusted(
                MemberRecord,
                name=self.name,
                nonce=self.nonce,
                address=self.address,
                incarnation=self.incarnation,
                state=self.state,
                meta=self.meta,
                _alive=self.alive,
            )
            self._record_key = key
        return self._record  # type: ignore[return-value]

    def fresh_alive(self) -> Alive:
        """A new Alive for the current incarnation and metadata (for this member itself)."""
        self.alive = Alive(
            name=self.name,
            nonce=self.nonce,
            incarnation=self.incarnation,
            address=self.address,
            meta=self.meta,
        )
        return self.alive


def _read_only(meta: Mapping[str, MetaValue]) -> MappingProxyType[str, MetaValue]:
    """A read-only view of an update's metadata (updates are immutable and never edited)."""
    return meta if isinstance(meta, MappingProxyType) else MappingProxyType(meta)  # type: ignore[arg-type]


class MemberTable:
    """The other members, their suspicions, and the dead ones not yet forgotten."""

    def __init__(self, config: GossipConfig, owner: str, rng: random.Random) -> None:
        self.config = config
        self.owner = owner  # our own name: the source of the deaths we declare
        self.order = ProbeOrder(rng)
        self.full_drops = 0
        self.deaths_held = 0  # expired suspicions held because the suspect's link was up
        self._rng = rng
        self._members: dict[str, Member] = {}
        self._names: list[str] = []  # same members, for O(1) random picks
        self._slot: dict[str, int] = {}
        self._live = 0
        self._suspects: set[str] = set()  # names of the members in SUSPECT
        self._events: list[MemberEvent] = []
        self._suspicions: list[tuple[float, int, str, Suspicion]] = []  # heap, lazily pruned
        self._pushes = 0
        self._forget: collections.deque[tuple[float, str, int]] = collections.deque()

    def __len__(self) -> int:
        return len(self._members)

    @property
    def live_count(self) -> int:
        """Other members that are ALIVE or SUSPECT."""
        return self._live

    def get(self, name: str) -> Member | None:
        return self._members.get(name)

    def is_live(self, name: str) -> bool:
        member = self._members.get(name)
        return member is not None and member.state in LIVE

    def names(self) -> list[str]:
        return self._names

    def records(self) -> list[MemberRecord]:
        return [m.record() for m in self._members.values()]

    def views(self) -> list[MemberView]:
        return [m.view() for m in self._members.values()]

    def suspect_addresses(self) -> set[str]:
        """The gossip addresses of the members suspected now."""
        return {self._members[name].address for name in self._suspects}

    def take_events(self) -> list[MemberEvent]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ merging

    def apply(self, update: Update, now_s: float) -> bool:
        """Merges ``update``; True if it changed the table (news worth gossiping on)."""
        held = self._members.get(update.name)
        if held is not None and held.last_update is update:
            return False  # seen last time: no news now (the same object comes back often)
        changed = self._apply(held, update, now_s)
        held = self._members.get(update.name)
        if held is not None:  # applied or not, it can never be news again: states only rise
            held.last_update = update
        return changed

    def _apply(self, held: Member | None, update: Update, now_s: float) -> bool:
        kind = update.kind
        if held is None:
            order, state = Order.NEWER, None
        else:
            held_id = (held.nonce, held.incarnation)
            order, state = order_of(kind, held_id, (update.nonce, update.incarnation)), held.state
        target = next_state(update.name, state, kind, order)
        if target is None:
            return False
        if held is None:
            assert isinstance(update, Alive)  # the table only learns members from Alive
            return self._add(update, now_s)
        if isinstance(update, Alive):
            self._revive(held, update, now_s)
            return True
        if isinstance(update, Suspect):
            return self._suspect(held, update, order, now_s)
        self._bury(held, update.incarnation, target, now_s)
        return True

    def _add(self, update: Alive, now_s: float) -> bool:
        if len(self._members) >= self.config.max_members:
            self.full_drops += 1
            return False
        member = Member(
            name=update.name,
            nonce=update.nonce,
            address=update.address,
            incarnation=update.incarnation,
            state=MemberState.ALIVE,
            meta=_read_only(update.meta),
            state_since_s=now_s,
            alive=update,
        )
        self._members[member.name] = member
        self._slot[member.name] = len(self._names)
        self._names.append(member.name)
        self._live += 1
        self.order.add(member.name)
        self._publish(EventKind.JOINED, member)
        return True

    def _revive(self, held: Member, update: Alive, now_s: float) -> None:
        new_boot = update.nonce != held.nonce
        changed = held.address != update.address or dict(held.meta) != dict(update.meta)
        was = held.state
        held.nonce = update.nonce
        held.incarnation = update.incarnation
        held.address = update.address
        held.meta = _read_only(update.meta)
        held.alive = update
        self._set_state(held, MemberState.ALIVE, now_s)
        if was not in LIVE:
            self.order.add(held.name)
        if new_boot:
            self._publish(EventKind.JOINED, held)
        elif was is not MemberState.ALIVE:
            self._publish(EventKind.ALIVE, held)
        elif changed:
            self._publish(EventKind.UPDATED, held)

    def _suspect(self, held: Member, update: Suspect, order: Order, now_s: float) -> bool:
        if held.state is MemberState.SUSPECT and order is Order.SAME:
            suspicion = held.suspicion
            if suspicion is None or not suspicion.confirm(update.source):
                return False
            self._schedule(held.name, suspicion)
            return True
        was = held.state
        held.incarnation = update.incarnation
        self._set_state(held, MemberState.SUSPECT, now_s)
        if was not in LIVE:
            self.order.add(held.name)
        n = self._live + 1
        config = self.config
        min_s = suspicion_min_timeout_s(config.suspicion_mult, n, config.probe_interval_s)
        held.suspicion = Suspicion(
            start_s=now_s,
            min_s=min_s,
            max_s=min_s * config.suspicion_max_timeout_mult,
            k=expected_confirmations(config.suspicion_confirmations, n),
            first_source=update.source,
        )
        self._schedule(held.name, held.suspicion)
        self._publish(EventKind.SUSPECT, held)
        return True

    def _bury(self, held: Member, incarnation: int, state: MemberState, now_s: float) -> None:
        was = held.state
        held.incarnation = incarnation
        self._set_state(held, state, now_s)
        if state is was:
            return
        self._publish(_EVENT_OF[state], held)
        self._forget.append((now_s + self.config.dead_retention_s, held.name, held.nonce))
        if state is MemberState.DEAD:
            log.info("member %s declared dead at incarnation %d", held.name, incarnation)

    def _set_state(self, member: Member, state: MemberState, now_s: float) -> None:
        self._live += (state in LIVE) - (member.state in LIVE)
        if state is not member.state:
            member.state_since_s = now_s
        member.state = state
        if state is MemberState.SUSPECT:
            self._suspects.add(member.name)
        else:
            self._suspects.discard(member.name)
            member.suspicion = None

    def _publish(self, kind: EventKind, member: Member) -> None:
        self._events.append(MemberEvent(kind=kind, member=member.view()))

    # ------------------------------------------------------------------ timers

    def _schedule(self, name: str, suspicion: Suspicion) -> None:
        self._pushes += 1
        heapq.heappush(self._suspicions, (suspicion.deadline_s, self._pushes, name, suspicion))

    def _current(self, entry: tuple[float, int, str, Suspicion]) -> bool:
        deadline, _, name, suspicion = entry
        member = self._members.get(name)
        return (
            member is not None
            and member.suspicion is suspicion
            and suspicion.deadline_s == deadline
        )

    def next_deadline_s(self) -> float:
        """When the next suspicion expires or the next dead member may be forgotten."""
        heap = self._suspicions
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        suspicion_s = heap[0][0] if heap else _INF
        forget_s = self._forget[0][0] if self._forget else _INF
        return min(suspicion_s, forget_s)

    def expire(
        self, now_s: float, verify_s: float, links_up: Set[str] = frozenset()
    ) -> tuple[list[Dead], list[Member]]:
        """Runs out suspicions: a suspicion whose timeout passed is verified first (returned,
        for the caller to ping the suspect, with ``verify_s`` to answer); one whose
        verification passed unanswered becomes a death (returned, to gossip).

        A suspect whose address is in ``links_up`` (its process answers at the transport
        level, see `Swim.link_changed`) is held instead, verified again every probe interval,
        until ``stall_grace_s`` after its suspicion began (counted in ``deaths_held``)."""
        deaths: list[Dead] = []
        verify: list[Member] = []
        heap = self._suspicions
        while heap and heap[0][0] <= now_s:
            entry = heapq.heappop(heap)
            if not self._current(entry):
                continue
            member = self._members[entry[2]]
            suspicion = member.suspicion
            assert suspicion is not None
            if suspicion.verify_by_s is None:
                suspicion.verify_by_s = now_s + verify_s
                self._schedule(member.name, suspicion)
                verify.append(member)
                continue
            if member.address in links_up and now_s - suspicion.start_s < self.config.stall_grace_s:
                self.deaths_held += 1
                suspicion.verify_by_s = now_s + self.config.probe_interval_s
                self._schedule(member.name, suspicion)
                verify.append(member)
                continue
            dead = Dead(
                name=member.name,
                nonce=member.nonce,
                incarnation=member.incarnation,
                source=self.owner,
            )
            self.apply(dead, now_s)
            deaths.append(dead)
        self._forget_expired(now_s)
        return deaths, verify

    def _forget_expired(self, now_s: float) -> None:
        retention_s = self.config.dead_retention_s
        while self._forget and self._forget[0][0] <= now_s:
            _, name, nonce = self._forget.popleft()
            member = self._members.get(name)
            if (
                member is None
                or member.nonce != nonce
                or member.state in LIVE
                or member.state_since_s + retention_s > now_s
            ):
                continue
            del self._members[name]
            slot = self._slot.pop(name)
            last = self._names.pop()
            if last != name:
                self._names[slot] = last
                self._slot[last] = slot

    # ------------------------------------------------------------------ random picks

    def pick(self, count: int, *, exclude: str | None = None, alive_only: bool) -> list[Member]:
        """Up to ``count`` distinct random live members (ALIVE only if ``alive_only``)."""
        if count <= 0 or not self._live:
            return []
        wanted = (MemberState.ALIVE,) if alive_only else LIVE
        names, members = self._names, self._members
        picked: list[Member] = []
        seen: set[str] = set()
        draw, size = self._rng.random, len(names)
        for _ in range(_RANDOM_TRIES_PER_PICK * count + 8):  # cheap while most are live
            member = members[names[int(draw() * size)]]
            if member.name not in seen and member.name != exclude and member.state in wanted:
                seen.add(member.name)
                picked.append(member)
                if len(picked) == count:
                    return picked
        pool = [m for m in members.values() if m.name != exclude and m.state in wanted]
        return self._rng.sample(pool, min(count, len(pool)))

    def pick_dead(self) -> Member | None:
        """A random member held DEAD (not LEFT): a reconnect candidate after a partition."""
        candidates = [(name, nonce) for _, name, nonce in self._forget]
        for _ in range(_RANDOM_TRIES_PER_PICK):
            if not candidates:
                return None
            name, nonce = candidates[self._rng.randrange(len(candidates))]
            member = self._members.get(name)
            if member is not None and member.nonce == nonce and member.state is MemberState.DEAD:
                return member
        return None
