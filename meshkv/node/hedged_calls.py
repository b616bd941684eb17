"""Requests to the first of several candidate holders, hedged to the next when one is silent.

`call_hedged` runs a set of tasks (a lookup of some keys, a get of a piece) on one
`RequestClient`. Each task has candidate holders, best first. It sends every task to its first
candidate, then waits for replies; a holder with requests outstanding that has said nothing for
the hedge delay (`meshkv.node.hedging`) is avoided and each of its unsettled tasks goes to the
task's next candidate as well. Whichever reply settles a task first wins; later ones are still
handed to ``on_reply`` only if the task is not settled yet. A task whose reply does not settle
it (an error, a short answer) goes to its next candidate at once, or to the holder the reply
names (a greeted holder asked again, a holder a pointer names). Nothing waits past the
deadline; what is unanswered then is simply unanswered (a miss).

The usual call is one task (an engine's lookup, a get from one holder): its first candidate is
asked alone, with one wait for the hedge delay and none of the bookkeeping of many tasks; only
if it stays silent or its reply does not settle the task does the general loop take over, with
that request still outstanding (a late reply still counts).

`HedgeState` is a member's shared hedging state (observed round trips and avoided members)
behind one lock: every reader thread of the member uses it.

This module knows the request client and the hedging rule; not what a lookup or a get means,
nor membership, the store or sockets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.node.hedging import AvoidList, RoundTrips

log = logging.getLogger("vllm.meshkv.node.hedged_calls")

Clock = Callable[[], float]


class HedgeState:
    """Round trips observed and members avoided, shared by a member's threads."""

    def __init__(self, config: DataPlaneConfig, clock: Clock = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._round_trips = RoundTrips(config)
        self._avoided = AvoidList(config)
        self._clock = clock

    def delay_s(self) -> float:
        with self._lock:
            return self._round_trips.hedge_delay_s()

    def record(self, round_trip_s: float) -> None:
        with self._lock:
            self._round_trips.record(round_trip_s)

    def avoid(self, name: str) -> None:
        with self._lock:
            self._avoided.avoid(name, self._clock())

    def clear(self, name: str) -> None:
        """A reply from ``name``, or gossip, says it is back."""
        with self._lock:
            self._avoided.clear(name)

    def is_avoided(self, name: str) -> bool:
        with self._lock:
            return self._avoided.is_avoided(name, self._clock())

    def order(self, candidates: Sequence[str]) -> list[str]:
        """``candidates`` with the avoided ones last."""
        with self._lock:
            return self._avoided.order(candidates, self._clock())


@dataclass(slots=True)
class _Attempt:
    task: int
    holder: str
    sent_s: float


Request = Callable[[int, str], tuple[str, m.Message] | None]
"""(task, holder) -> (address, request) to send, or None if that holder cannot be asked."""
OnReply = Callable[[int, str, m.Message], bool | str]
"""(task, holder, reply) -> True if the reply settles the task; False to ask its next
candidate; a member's name to ask that member now (the same holder again, after a greeting)."""


def call_hedged(
    client: RequestClient,
    candidates: Sequence[Sequence[str]],
    *,
    request: Request,
    on_reply: OnReply,
    state: HedgeState,
    deadline_s: float,
    clock: Clock = time.monotonic,
) -> list[bool]:
    """Runs one task per entry of ``candidates`` (see the module docstring); returns which
    tasks were settled."""
    call = _HedgedCall(client, candidates, request, on_reply, state, clock)
    if len(candidates) == 1:
        if call.first_alone(deadline_s):
            return call.settled
    else:
        for task in range(len(candidates)):
            call.ask_next(task)
    call.run(deadline_s)
    return call.settled


def _send(client: RequestClient, request: Request, task: int, holder: str) -> int | None:
    """Builds and sends ``task``'s request to ``holder``; its request id, or None if that
    holder cannot be asked or the send failed."""
    built = request(task, holder)
    if built is None:
        log.debug("task %d: %s cannot be asked (not a live peer, or nothing left)", task, holder)
        return None
    address, message = built
    if not client.send_only(address, message):
        log.debug("task %d: %s: send failed", task, holder)
        return None
    return message.req


class _HedgedCall:
    """One `call_hedged`: who was asked for what, who answered, who fell silent."""

    __slots__ = (
        "attempts",
        "candidates",
        "client",
        "clock",
        "heard_s",
        "live",
        "on_reply",
        "outstanding",
        "request",
        "settled",
        "silent",
        "state",
        "tried",
        "waiting",
    )

    def __init__(
        self,
        client: RequestClient,
        candidates: Sequence[Sequence[str]],
        request: Request,
        on_reply: OnReply,
        state: HedgeState,
        clock: Clock,
    ) -> None:
        self.client = client
        self.candidates = candidates
        self.request = request
        self.on_reply = on_reply
        self.state = state
        self.clock = clock
        self.tried = [0] * len(candidates)  # candidates of each task asked (or skipped) so far
        self.live = [0] * len(candidates)  # its requests still outstanding
        self.settled = [False] * len(candidates)
        self.attempts: list[_Attempt] = []
        self.waiting: dict[int, int] = {}  # request id -> index into attempts
        self.heard_s: dict[str, float] = {}  # per holder: its last reply, or when first asked
        self.outstanding: dict[str, set[int]] = {}  # per holder: its unanswered attempts
        self.silent: set[str] = set()  # holders silent past the hedge delay in this call

    def first_alone(self, deadline_s: float) -> bool:
        """The usual call, one task: its first candidate that can be asked is asked alone and
        waited for (for the hedge delay; until the deadline if no candidate is left after it),
        with no bookkeeping until it is needed. True if its reply settled the task; else the
        call's state says what happened (that request outstanding if it was silent, the next
        candidate asked) and `run` goes on."""
        order, client = self.candidates[0], self.client
        req = None
        while req is None and self.tried[0] < len(order):
            holder = order[self.tried[0]]
            self.tried[0] += 1
            req = _send(client, self.request, 0, holder)
        if req is None:
            return False
        sent_s = self.clock()
        delay_s = self.state.delay_s()
        until_s = deadline_s
        if self.tried[0] < len(order):
            until_s = min(deadline_s, sent_s + delay_s)
        waiting = {req: 0}
        for _, reply in client.answers(waiting, until_s):
            now_s = self.clock()
            self.state.record(now_s - sent_s)
            self.state.clear(holder)
            self.judge(0, holder, reply)
            return self.settled[0]
        self._sent(0, holder, req, sent_s)  # silent: still awaited from here on
        if self.clock() < deadline_s:
            self.fall_silent(holder, delay_s)
        return False

    def run(self, deadline_s: float) -> None:
        """Waits for replies and hedges silent holders until every task is settled, nothing is
        awaited, or the deadline passes; then gives up what is still awaited."""
        outstanding, silent, heard_s = self.outstanding, self.silent, self.heard_s
        while self.waiting and not all(self.settled):  # (a silent holder may never answer)
            if self.clock() >= deadline_s:
                break
            delay_s = self.state.delay_s()
            overdue_s = [
                heard_s[h] + delay_s for h, ids in outstanding.items() if ids and h not in silent
            ]
            until_s = min([deadline_s, *overdue_s])
            for index, reply in self.client.answers(self.waiting, until_s):
                sent = len(self.attempts)
                self.take(index, reply)
                if all(self.settled) or len(self.attempts) > sent:
                    break  # done, or a new request: its hedge time is due sooner than until_s
            now_s = self.clock()
            for holder, ids in list(outstanding.items()):
                if ids and holder not in silent and now_s >= heard_s[holder] + delay_s:
                    self.fall_silent(holder, delay_s)
        self.client.stats["timeout"] += len(self.waiting)
        if self.waiting:
            log.debug("deadline: %d requests unanswered", len(self.waiting))
        for req in self.waiting:  # no longer awaited: their sockets need not be polled for them
            self.client.give_up(req)

    def ask(self, task: int, holder: str) -> bool:
        if holder in self.silent:
            return False
        req = _send(self.client, self.request, task, holder)
        if req is None:
            return False
        self._sent(task, holder, req, self.clock())
        return True

    def _sent(self, task: int, holder: str, req: int, sent_s: float) -> None:
        index = len(self.attempts)
        self.waiting[req] = index
        self.attempts.append(_Attempt(task, holder, sent_s))
        ids = self.outstanding.setdefault(holder, set())
        if not ids:
            self.heard_s[holder] = sent_s
        ids.add(index)
        self.live[task] += 1

    def ask_next(self, task: int) -> bool:
        """Asks ``task``'s next candidate that can be asked; False if none is left."""
        candidates, tried = self.candidates[task], self.tried
        while tried[task] < len(candidates):
            tried[task] += 1
            if self.ask(task, candidates[tried[task] - 1]):
                return True
        return False

    def take(self, index: int, reply: m.Message) -> None:
        """A reply to attempt ``index``: the holder is heard, and the task settled, asked
        again of the holder the reply names, or asked of its next candidate."""
        attempt = self.attempts[index]
        holder, task = attempt.holder, attempt.task
        now_s = self.clock()
        self.state.record(now_s - max(attempt.sent_s, self.heard_s[holder]))
        self.heard_s[holder] = now_s
        self.outstanding[holder].discard(index)
        self.live[task] -= 1
        self.silent.discard(holder)  # it answered: slow, not gone
        self.state.clear(holder)
        if not self.settled[task]:
            self.judge(task, holder, reply)

    def judge(self, task: int, holder: str, reply: m.Message) -> None:
        """``on_reply``'s verdict on a reply to unsettled ``task``: settled, or asked again of
        the holder it names, or (with nothing else outstanding) asked of its next candidate."""
        verdict = self.on_reply(task, holder, reply)
        if verdict is True:
            self.settled[task] = True
        elif not (isinstance(verdict, str) and self.ask(task, verdict)) and not self.live[task]:
            self.ask_next(task)

    def fall_silent(self, holder: str, delay_s: float) -> None:
        """``holder`` said nothing for the hedge delay: avoided, and each of its unsettled
        tasks asked of its next candidate."""
        log.debug("%s silent %.3f s (hedge delay %.3f s): avoided", holder,
                  self.clock() - self.heard_s[holder], delay_s)  # fmt: skip
        self.silent.add(holder)
        self.state.avoid(holder)
        for task in sorted({self.attempts[i].task for i in self.outstanding[holder]}):
            if not self.settled[task]:
                self.ask_next(task)
