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
    tried = [0] * len(candidates)  # candidates of each task asked (or skipped) so far
    live = [0] * len(candidates)  # its requests still outstanding
    settled = [False] * len(candidates)
    attempts: list[_Attempt] = []
    waiting: dict[int, int] = {}  # request id -> index into attempts
    heard_s: dict[str, float] = {}  # per holder: its last reply, or when it was first asked
    outstanding: dict[str, set[int]] = {}  # per holder: its unanswered attempts
    silent: set[str] = set()  # holders that stayed silent past the hedge delay in this call

    def ask(task: int, holder: str) -> bool:
        if holder in silent:
            return False
        built = request(task, holder)
        if built is None:
            log.debug("task %d: %s cannot be asked (not a live peer, or nothing left)", task,
                      holder)  # fmt: skip
            return False
        address, message = built
        if not client.send_only(address, message):
            log.debug("task %d: %s: send failed", task, holder)
            return False
        now_s = clock()
        waiting[message.req] = len(attempts)
        attempts.append(_Attempt(task, holder, now_s))
        if not outstanding.get(holder):
            heard_s[holder] = now_s
        outstanding.setdefault(holder, set()).add(len(attempts) - 1)
        live[task] += 1
        return True

    def ask_next(task: int) -> None:
        while tried[task] < len(candidates[task]):
            tried[task] += 1
            if ask(task, candidates[task][tried[task] - 1]):
                return

    for task in range(len(candidates)):
        ask_next(task)
    while waiting and not all(settled):  # (a silent holder's requests may stay unanswered)
        now_s = clock()
        if now_s >= deadline_s:
            break
        delay_s = state.delay_s()
        overdue_s = [
            heard_s[h] + delay_s for h, ids in outstanding.items() if ids and h not in silent
        ]
        until_s = min([deadline_s, *overdue_s])
        for index, reply in client.answers(waiting, until_s):
            sent = len(attempts)
            attempt = attempts[index]
            holder, task = attempt.holder, attempt.task
            now_s = clock()
            state.record(now_s - max(attempt.sent_s, heard_s[holder]))
            heard_s[holder] = now_s
            outstanding[holder].discard(index)
            live[task] -= 1
            silent.discard(holder)  # it answered: slow, not gone
            state.clear(holder)
            if settled[task]:
                continue
            verdict = on_reply(task, holder, reply)
            if verdict is True:
                settled[task] = True
            elif not (isinstance(verdict, str) and ask(task, verdict)) and live[task] == 0:
                ask_next(task)
            if all(settled) or len(attempts) > sent:
                break  # done, or a new request: its hedge time is due sooner than until_s
        now_s = clock()
        for holder, ids in list(outstanding.items()):
            if ids and holder not in silent and now_s >= heard_s[holder] + delay_s:
                log.debug("%s silent %.3f s (hedge delay %.3f s): avoided", holder,
                          now_s - heard_s[holder], delay_s)  # fmt: skip
                silent.add(holder)
                state.avoid(holder)
                for task in sorted({attempts[i].task for i in ids}):
                    if not settled[task]:
                        ask_next(task)
    client.stats["timeout"] += len(waiting)
    if waiting:
        log.debug("deadline: %d requests unanswered", len(waiting))
    for req in waiting:  # no longer awaited: their sockets need not be polled for them
        client.give_up(req)
    return settled
