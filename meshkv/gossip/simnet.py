"""A deterministic in-memory network that runs many `Swim` members on a virtual clock.

One seed drives everything: member nonces and randomness, message delay, loss, duplication.
Faults are scripted: partitions (groups that cannot reach each other), stalls (a member neither
receives nor ticks for a while, like SIGSTOP; frames sent to it queue up and are handed over
when it resumes), crashes and restarts (same name and address, new nonce, new incarnation).

The loop is one heap of timed events (deliver a frame, tick a member, run a scripted action),
so idle members cost nothing. Every member's events update a per-observer view, and every event
goes through `_check_event`, which raises `InvariantError` (carrying the seed) when an observer's
incarnations go backwards or its transitions make no sense; deaths of members that are up,
reachable and not stalled are recorded in ``false_deaths``.

This module is a test and benchmark harness: it knows the core only through `Swim`'s API.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.member import MemberInfo, MemberState
from meshkv.gossip.messages import (
    MemberRecord,
    StateQuery,
    StateReply,
    decode_message,
    encode_message,
    gossip_codec,
)
from meshkv.gossip.swim import Swim

EPOCH_MS = 1_700_000_000_000  # virtual wall clock at t=0, for incarnation numbers
MAX_TICKS_AT_ONE_INSTANT = 64  # a member asking for more has a timer that never advances

_DELIVER, _TICK, _RESUME, _CALL = range(4)
_STATE_OF_EVENT = {
    EventKind.JOINED: MemberState.ALIVE,
    EventKind.UPDATED: MemberState.ALIVE,
    EventKind.ALIVE: MemberState.ALIVE,
    EventKind.SUSPECT: MemberState.SUSPECT,
    EventKind.DEAD: MemberState.DEAD,
    EventKind.LEFT: MemberState.LEFT,
}


class InvariantError(AssertionError):
    """A simulated run broke an invariant; replay it with the seed in the message."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkFaults:
    """Per-message delay and faults, drawn from the run's seed."""

    delay_s: float = 0.0005  # fixed one-way delay
    jitter_s: float = 0.001  # plus uniform 0..jitter_s
    loss: float = 0.0  # probability a frame is lost
    duplicate: float = 0.0  # probability a frame arrives twice


@dataclass(slots=True)
class SimMember:
    name: str
    address: str
    swim: Swim
    nonce: int
    up: bool = True
    stalled_until_s: float = 0.0
    inbox: list[tuple[bytes, object | None]] = field(default_factory=list)
    tick_at_s: float = float("inf")
    ticks_at_instant: int = 0
    sent: int = 0
    watching: dict[str, bool] = field(default_factory=dict)
    """The addresses its driver keeps a link to (its core's suspects), and whether it told the
    core that link is up."""


@dataclass(frozen=True, slots=True)
class FalseDeath:
    at_s: float
    observer: str
    subject: str


class SimNet:
    """N members on one virtual clock; see the module docstring."""

    def __init__(
        self, *, seed: int, config: GossipConfig, faults: NetworkFaults | None = None
    ) -> None:
        self.seed = seed
        self.config = config
        self.faults = faults or NetworkFaults()
        self.now_s = 0.0
        self.rng = random.Random(seed)
        self.members: dict[str, SimMember] = {}
        self.views: dict[str, dict[str, tuple[int, MemberState, int]]] = {}
        self._alive_counts: dict[str, int] = {}  # per observer: members it holds ALIVE
        self.false_deaths: list[FalseDeath] = []
        self.event_log: list[tuple[float, str, MemberEvent]] = []
        self.keep_event_log = False
        self.listeners: list[Callable[[float, str, MemberEvent], None]] = []
        self.counters = {"sent": 0, "delivered": 0, "lost": 0, "cut": 0, "to_down": 0}
        self._by_address: dict[str, SimMember] = {}
        self._groups: dict[str, int] = {}
        self._cut_links: set[frozenset[str]] = set()
        self._answering: set[str] = set()  # members whose process answers links (`set_link`)
        self._heap: list[tuple[float, int, int, object, object]] = []
        self._pushed = 0
        self._replies: dict[int, list[bytes]] = {}
        self._codec = gossip_codec(config)

    def __repr__(self) -> str:
        return f"SimNet(seed={self.seed}, t={self.now_s:.3f}s, members={len(self.members)})"

    # ------------------------------------------------------------------ building and faults

    def add_member(
        self, name: str, *, seeds: Iterable[str] = (), meta: dict | None = None
    ) -> SimMember:
        """Boots member ``name`` now (a new nonce if it existed before) and joins ``seeds``."""
        old = self.members.get(name)
        address = (
            old.address
            if old
            else f"10.{len(self.members) // 250}.{len(self.members) % 250}.1:7946"
        )
        nonce = self.rng.getrandbits(64)
        swim = Swim(
            config=self.config,
            me=MemberInfo(name=name, nonce=nonce, address=address, meta=meta or {}),
            incarnation_start=EPOCH_MS + int(self.now_s * 1000),
            rng=random.Random(self.rng.getrandbits(64)),
            now_s=self.now_s,
        )
        member = SimMember(name=name, address=address, swim=swim, nonce=nonce)
        self.members[name] = member
        self._by_address[address] = member
        self.views[name] = {}
        self._alive_counts[name] = 0
        seed_addresses = [self.members[s].address for s in seeds if s in self.members]
        if seed_addresses:
            swim.join(seed_addresses, self.now_s)
        self._flush(member)
        return member

    def crash(self, name: str) -> None:
        self.set_link(name, False)  # its connections close
        member = self.members[name]
        member.up = False
        member.inbox.clear()
        self._by_address.pop(member.address, None)
        self.views.pop(name, None)

    def restart(self, name: str, *, seeds: Iterable[str]) -> SimMember:
        """Boots a crashed member again: same name and address, new nonce and incarnation."""
        if self.members[name].up:
            self.crash(name)
        return self.add_member(name, seeds=seeds)

    def stall(self, name: str, duration_s: float) -> None:
        """Freezes ``name`` for ``duration_s``: no ticks, frames queue until it resumes."""
        member = self.members[name]
        member.stalled_until_s = self.now_s + duration_s
        self._push(member.stalled_until_s, _RESUME, member, None)

    def set_link(self, name: str, up: bool) -> None:
        """Whether ``name``'s process answers at the transport level while its gossip loop may
        not (a GIL stall: its ZMQ I/O thread answers). Each member's driver tells its core of
        a link only while the core watches that address (`Swim.watched_addresses`: its
        suspects), as `GossipRunner` does with the transport's watched links."""
        if up:
            self._answering.add(name)
        else:
            self._answering.discard(name)
        address = self.members[name].address
        for other in self.members.values():
            if other.up and address in other.watching and other.watching[address] != up:
                other.watching[address] = up
                other.swim.link_changed(address, up)

    def partition(self, *groups: Iterable[str]) -> None:
        """Members in different groups cannot reach each other; ungrouped reach everyone."""
        self._groups = {name: index for index, group in enumerate(groups) for name in group}

    def cut_link(self, a: str, b: str) -> None:
        """``a`` and ``b`` cannot reach each other (both may still reach everyone else)."""
        self._cut_links.add(frozenset((a, b)))

    def heal(self) -> None:
        """Ends every partition and cut link."""
        self._groups = {}
        self._cut_links = set()

    def at(self, at_s: float, action: Callable[[], None]) -> None:
        """Runs ``action`` at virtual time ``at_s``."""
        self._push(at_s, _CALL, action, None)

    def up_names(self) -> list[str]:
        return [name for name, member in self.members.items() if member.up]

    # ------------------------------------------------------------------ running

    def run_until(self, until_s: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until_s:
            at_s, _, kind, a, b = heapq.heappop(heap)
            self.now_s = at_s
            if kind == _DELIVER:
                self._deliver(a, b)  # type: ignore[arg-type]
            elif kind == _TICK:
                self._tick(a, at_s)  # type: ignore[arg-type]
            elif kind == _RESUME:
                self._resume(a)  # type: ignore[arg-type]
            else:
                a()  # type: ignore[operator]
        self.now_s = max(self.now_s, until_s)

    def run_for(self, duration_s: float) -> None:
        self.run_until(self.now_s + duration_s)

    def run_until_true(
        self, predicate: Callable[[], bool], *, timeout_s: float, step_s: float = 0.05
    ) -> float | None:
        """Runs until ``predicate()`` holds (checked every ``step_s``); the time it took, or
        None if ``timeout_s`` passed first."""
        start_s = self.now_s
        while self.now_s - start_s < timeout_s:
            if predicate():
                return self.now_s - start_s
            self.run_for(step_s)
        return self.now_s - start_s if predicate() else None

    def query_state(self, name: str, query_id: int = 1) -> list[MemberRecord]:
        """Asks ``name`` for its member table the way a CLI client would."""
        member = self.members[name]
        token = query_id
        self._replies[token] = []
        frame = encode_message(self._codec, StateQuery(query_id=query_id))
        member.swim.receive(frame, self.now_s, reply_to=token)
        self._flush(member)
        parts: dict[int, StateReply] = {}
        for reply_frame in self._replies.pop(token):
            reply = decode_message(self._codec, reply_frame)
            assert isinstance(reply, StateReply) and reply.query_id == query_id
            parts[reply.part] = reply
        assert parts and len(parts) == next(iter(parts.values())).parts, "missing reply parts"
        return [record for index in sorted(parts) for record in parts[index].records]

    # ------------------------------------------------------------------ observation

    def state_seen(self, observer: str, subject: str) -> MemberState | None:
        entry = self.views.get(observer, {}).get(subject)
        return None if entry is None else entry[1]

    def alive_seen(self, observer: str) -> set[str]:
        view = self.views.get(observer, {})
        return {name for name, (_, state, _) in view.items() if state is MemberState.ALIVE}

    def converged(self) -> bool:
        """Every up member sees every other up member (current boot) ALIVE, and no one else."""
        up = {name: m.nonce for name, m in self.members.items() if m.up}
        alive_counts = self._alive_counts
        if any(alive_counts[observer] != len(up) - 1 for observer in up):
            return False  # the cheap test first: it fails during most of a run
        for observer in up:
            view = self.views[observer]
            alive = 0
            for name, (nonce, state, _) in view.items():
                if state is MemberState.ALIVE:
                    if up.get(name) != nonce:
                        return False
                    alive += 1
            if alive != len(up) - 1:
                return False
        return True

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            raise InvariantError(f"{message} [replay: seed={self.seed}, t={self.now_s:.3f}s]")

    # ------------------------------------------------------------------ internals

    def _push(self, at_s: float, kind: int, a: object, b: object) -> None:
        self._pushed += 1
        heapq.heappush(self._heap, (at_s, self._pushed, kind, a, b))

    def _deliver(self, address: str, frame: bytes) -> None:
        member = self._by_address.get(address)
        if member is None or not member.up:
            self.counters["to_down"] += 1
            return
        if self.now_s < member.stalled_until_s:
            member.inbox.append((frame, None))
            return
        self.counters["delivered"] += 1
        member.swim.receive(frame, self.now_s)
        self._flush(member)

    def _tick(self, member: SimMember, at_s: float) -> None:
        if not member.up or member.tick_at_s != at_s or self.now_s < member.stalled_until_s:
            return
        member.tick_at_s = float("inf")
        member.swim.tick(self.now_s)
        self._flush(member)

    def _resume(self, member: SimMember) -> None:
        if not member.up or self.now_s < member.stalled_until_s:
            return
        inbox, member.inbox = member.inbox, []
        for frame, _ in inbox:  # what queued in the socket is read before timers fire
            self.counters["delivered"] += 1
            member.swim.receive(frame, self.now_s)
        member.swim.tick(self.now_s)
        member.tick_at_s = float("inf")
        self._flush(member)

    def _sync_links(self, member: SimMember) -> None:
        """Opens and closes ``member``'s watched links as its core's suspects change: a new one
        is up at once if the suspect's process answers; a closed one that was up goes down."""
        watched = member.swim.watched_addresses()
        watching = member.watching
        if not watched and not watching:
            return
        for address in [a for a in watching if a not in watched]:
            if watching.pop(address):
                member.swim.link_changed(address, False)
        for address in watched - watching.keys():
            target = self._by_address.get(address)
            up = target is not None and target.up and target.name in self._answering
            watching[address] = up
            if up:
                member.swim.link_changed(address, True)

    def _flush(self, member: SimMember) -> None:
        self._sync_links(member)
        swim = member.swim
        faults = self.faults
        rng = self.rng
        group = self._groups.get(member.name)
        for out in swim.take_outgoing():
            if out.address is None:
                self._replies.setdefault(out.reply_to, []).append(out.frame)  # type: ignore[arg-type]
                continue
            self.counters["sent"] += 1
            member.sent += 1
            target = self._by_address.get(out.address)
            if target is not None and self._is_cut(member.name, group, target.name):
                self.counters["cut"] += 1
                continue
            copies = 2 if faults.duplicate and rng.random() < faults.duplicate else 1
            for _ in range(copies):
                if faults.loss and rng.random() < faults.loss:
                    self.counters["lost"] += 1
                    continue
                delay_s = faults.delay_s + rng.random() * faults.jitter_s
                self._push(self.now_s + delay_s, _DELIVER, out.address, out.frame)
        for event in swim.take_events():
            self._observe(member, event)
        deadline_s = max(swim.next_deadline_s(), self.now_s)
        if deadline_s < member.tick_at_s:
            if deadline_s == self.now_s:
                member.ticks_at_instant += 1
                self.check(
                    member.ticks_at_instant <= MAX_TICKS_AT_ONE_INSTANT,
                    f"{member.name} keeps asking for a tick at the same instant",
                )
            else:
                member.ticks_at_instant = 0
            member.tick_at_s = deadline_s
            self._push(deadline_s, _TICK, member, None)

    def _is_cut(self, sender: str, group: int | None, receiver: str) -> bool:
        if group is not None:
            other = self._groups.get(receiver)
            if other is not None and other != group:
                return True
        return bool(self._cut_links) and frozenset((sender, receiver)) in self._cut_links

    def _observe(self, member: SimMember, event: MemberEvent) -> None:
        if not member.up:
            return
        self._check_event(member.name, event)
        subject = event.member
        view = self.views[member.name]
        before = view.get(subject.name)
        alive_now = subject.state is MemberState.ALIVE
        alive_before = before is not None and before[1] is MemberState.ALIVE
        self._alive_counts[member.name] += alive_now - alive_before
        view[subject.name] = (subject.nonce, subject.state, subject.incarnation)
        if self.keep_event_log:
            self.event_log.append((self.now_s, member.name, event))
        for listener in self.listeners:
            listener(self.now_s, member.name, event)

    def _check_event(self, observer: str, event: MemberEvent) -> None:
        subject = event.member
        held = self.views[observer].get(subject.name)
        first_sight = held is None and event.kind is EventKind.JOINED
        if first_sight and subject.name != observer and subject.state is MemberState.ALIVE:
            return  # the common case: nothing else to check
        self.check(subject.name != observer, f"{observer} got an event about itself")
        self.check(
            subject.state is _STATE_OF_EVENT[event.kind],
            f"{observer}: {event.kind.name} event carries state {subject.state.name}",
        )
        if held is not None and held[0] == subject.nonce:
            _, state, incarnation = held
            self.check(
                subject.incarnation >= incarnation,
                f"{observer} saw {subject.name} go from incarnation {incarnation} "
                f"to {subject.incarnation}",
            )
            if event.kind is EventKind.UPDATED:
                self.check(state is MemberState.ALIVE, f"{observer}: UPDATED from {state.name}")
            if event.kind is EventKind.ALIVE:
                self.check(state is not MemberState.ALIVE, f"{observer}: ALIVE while ALIVE")
            if event.kind is EventKind.JOINED:
                self.check(
                    state in (MemberState.DEAD, MemberState.LEFT),
                    f"{observer}: {subject.name} JOINED again while {state.name}",
                )
        elif held is None:
            self.check(event.kind is EventKind.JOINED, f"{observer}: first event {event.kind}")
        if event.kind is EventKind.DEAD:
            target = self.members.get(subject.name)
            reachable = self._groups.get(observer) == self._groups.get(subject.name) or (
                observer not in self._groups or subject.name not in self._groups
            )
            if target is not None and target.up and target.nonce == subject.nonce and reachable:
                self.false_deaths.append(FalseDeath(self.now_s, observer, subject.name))
