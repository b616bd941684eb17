"""What the chaos harness records about each get that served fewer chunks than a live member held.

`GetTraces` collects the read path's debug lines (``vllm.meshkv.node...``: the guesses, each
reply, the holders found silent, the lookup's answer) emitted on one reader thread between
`GetTraces.begin` and `GetTraces.end`, so a miss comes with the story of its get. The lines of
other threads (pushers, services, gossip) are dropped at once.

`MissLog` keeps the first `MISSES_KEPT_MAX` misses whole and counts every miss by cause
(`cause_of`). A miss's record says who held the chunks when the get ended (each source's
leading count), which members were frozen or down when it started and ended, how old the prompt
was, and what the reader's trace shows.

This module knows the harness's records and the read path's log lines; nothing in ``meshkv``
imports it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

TRACE_LOGGER = "vllm.meshkv.node"
TRACE_LINES_MAX = 200
"""Debug lines kept per get (a get's trace is short: a few lines per round trip)."""
MISSES_KEPT_MAX = 400
"""Miss records kept whole in the report (every miss is counted by cause)."""


class GetTraces(logging.Handler):
    """The read path's debug lines of the get running on each thread (see the module doc)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._local = threading.local()

    def install(self) -> None:
        logger = logging.getLogger(TRACE_LOGGER)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)

    def uninstall(self) -> None:
        logging.getLogger(TRACE_LOGGER).removeHandler(self)

    def begin(self) -> None:
        self._local.lines = []

    def end(self) -> list[str]:
        lines: list[str] = getattr(self._local, "lines", None) or []
        self._local.lines = None
        return lines

    def emit(self, record: logging.LogRecord) -> None:
        lines = getattr(self._local, "lines", None)
        if lines is not None and len(lines) < TRACE_LINES_MAX:
            lines.append(f"{record.relativeCreated / 1000:.3f} {record.getMessage()}")


def cause_of(miss: dict[str, Any]) -> str:
    """The miss's cause, from its record: the first rule that matches.

    - ``evicted_here``: the first missed chunk was in the reader's own store when the get
      began (the get lost it on the way: evicted to make room);
    - ``producer_only``: when the get ended, only the writer (the producer's own copy) held the
      first missed chunk, and the prompt was younger than ``fresh_s``: its pushes and pointers
      had not reached the replicas yet;
    - ``producer_only_late``: the same, older: its pushes or pointers were lost or stuck;
    - ``silent_holder``: a member the get found silent (frozen, or dead before gossip said so)
      held it;
    - ``off_placement``: only members off the key's preference list on the reader's ring
      (replicas, then pointer host) held it, and none of its candidates pointed at them;
    - ``holder_not_asked``: a member on that list held it and the get never asked it;
    - ``asked_holder_lacked``: every member that held it was asked and answered without it
      (it arrived after they answered: a push or a restore landing during the get);
    - ``other``.
    """
    first_missed = miss["served"]
    if first_missed in miss["local_before"]:
        return "evicted_here"
    holders = [src for src, held in miss["held_by"].items() if held > first_missed]
    trace = "\n".join(miss["trace"])
    if holders == ["writer"]:
        return "producer_only" if miss["age_s"] < miss["fresh_s"] else "producer_only_late"
    members = [h for h in holders if h not in ("writer", "reader")]
    if any(f"{h} silent" in trace for h in members):
        return "silent_holder"
    candidates = set(miss["placement"]["reader"])
    if members and not candidates & set(members):
        return "off_placement"
    if any(f"{h} answered" not in trace for h in members):
        return "holder_not_asked"
    if members:
        return "asked_holder_lacked"
    return "other"


class MissLog:
    """Misses by cause, and the first `MISSES_KEPT_MAX` records whole (thread-safe)."""

    def __init__(self, fresh_s: float) -> None:
        self._lock = threading.Lock()
        self._fresh_s = fresh_s
        self.by_cause: Counter[str] = Counter()
        self.chunks_by_cause: Counter[str] = Counter()
        self.kept: list[dict[str, Any]] = []

    def add(self, miss: dict[str, Any]) -> None:
        miss["fresh_s"] = self._fresh_s
        cause = miss["cause"] = cause_of(miss)
        with self._lock:
            self.by_cause[cause] += 1
            self.chunks_by_cause[cause] += miss["held"] - miss["served"]
            if len(self.kept) < MISSES_KEPT_MAX:
                self.kept.append(miss)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "gets_by_cause": dict(self.by_cause.most_common()),
                "chunks_by_cause": dict(self.chunks_by_cause.most_common()),
                "examples": list(self.kept),
            }
