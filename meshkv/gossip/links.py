"""Watched links: does a suspect's process still answer at the transport level?

SWIM suspects a member whose gossip thread missed its probes. That thread may be stuck while its
process runs (an engine holding the GIL for seconds), or the process may be frozen, killed or
cut off. Only the first deserves the stall grace (`GossipConfig.stall_grace_s`), and telling
them apart needs something that answers without the GIL: ZMQ's own I/O thread.

`SuspectLinks` keeps one extra DEALER per watched address (the suspects the core names; at
most `LinkLimits.watched_max`), that never carries a frame. Its link is

- **up** from the moment the suspect's kernel accepts the TCP connection, for as long as the
  ZMTP handshake and then heartbeats (answered by the suspect's ZMQ I/O thread) come within
  ``timeout_s``;
- **down** for good once the connection is refused or closes, or the handshake or a heartbeat
  goes unanswered for ``timeout_s`` (the socket never reconnects: a link that flapped back up
  would hold a frozen suspect for the whole stall grace).

So a running process is up, a frozen one is up for ``timeout_s`` at most (a SIGSTOP shorter
than that is held, a longer one is not), and a killed or unreachable one is down at once.

Only suspects are watched: heartbeating every peer costs each member a ZMQ wake-up per peer per
heartbeat interval, which at 64 members was half of an idle member's CPU. This module knows
ZMQ sockets and their monitor events; nothing of SWIM.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from meshkv.errors import UsageError

_LINK_EVENTS = {
    zmq.EVENT_CONNECTED: True,  # (the kernel accepted: a frozen process's does too)
    zmq.EVENT_HANDSHAKE_SUCCEEDED: True,
    zmq.EVENT_DISCONNECTED: False,
    zmq.EVENT_CLOSED: False,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: False,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: False,
    zmq.EVENT_MONITOR_STOPPED: False,
}
"""Monitor events that change a watched link."""
_MONITOR_EVENTS = sum(_LINK_EVENTS)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkLimits:
    """How watched links are kept."""

    heartbeat_interval_s: float = 1.0
    """How often a watched link sends a ZMTP heartbeat (s). 0 = no link is watched: every
    suspect is then declared dead on its suspicion timeout, stalled or not."""
    timeout_s: float = 2.5
    """How long a watched link waits for the suspect's handshake or for a heartbeat's answer
    before it goes down for good (s). Its clock starts when the suspicion does, some probe
    rounds after a freeze began: a SIGSTOP of 1 s (DESIGN §5's stall) is held, and a frozen
    member is declared dead everywhere 3.2-3.4 s after it froze (`tools/bench_frozen_member.py`,
    5 members, 5 rounds; 3.3-3.7 s when every peer link heartbeated with a 3 s timeout)."""
    watched_max: int = 32
    """Links watched at once; suspects past this are not watched (counted once each) until a
    link is free, so they may get no stall grace."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s < 0 or self.timeout_s <= 0 or self.watched_max <= 0:
            raise UsageError(
                "LinkLimits: heartbeat_interval_s must be >= 0, timeout_s and watched_max > 0"
            )


@dataclass(slots=True)
class _Link:
    sock: zmq.Socket
    monitor: zmq.Socket
    up: bool = False


class SuspectLinks:
    """The watched links of one member's transport; owned by its gossip thread."""

    def __init__(self, context: zmq.Context, limits: LinkLimits, stats: Counter[str]) -> None:
        self.limits = limits
        self._context = context
        self._stats = stats
        self._links: dict[str, _Link] = {}
        self._by_monitor: dict[zmq.Socket, str] = {}
        self._monitors = zmq.Poller()
        self._changes: dict[str, bool] = {}  # bounded: one entry per address watched lately
        # named but not watched: over the bound (retried as links free up), or malformed
        self._refused: set[str] = set()
        self._malformed: set[str] = set()

    def watch(self, addresses: Collection[str]) -> None:
        """Watches exactly ``addresses`` (up to ``watched_max``): opens the links that are new
        and closes the others (a closed link that was up is reported down). An address that
        cannot be watched (over the bound, or malformed) is counted once while it is named."""
        if self.limits.heartbeat_interval_s == 0:
            return
        wanted = set(addresses)
        for address in [a for a in self._links if a not in wanted]:
            self._close(address)
        self._refused &= wanted
        self._malformed &= wanted
        for address in wanted - self._links.keys() - self._malformed:
            if len(self._links) >= self.limits.watched_max:
                if address not in self._refused:
                    self._refused.add(address)
                    self._stats["transport.watch_refused"] += 1
            elif self._open(address):
                self._refused.discard(address)
            else:
                self._malformed.add(address)
                self._stats["transport.bad_address"] += 1

    def read(self) -> None:
        """Takes the monitor events that arrived (cheap: one poll of the watched links)."""
        if not self._links:
            return
        for monitor, _ in self._monitors.poll(0):
            address = self._by_monitor[monitor]
            link = self._links[address]
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                up = _LINK_EVENTS.get(event["event"])
                if up is not None and up != link.up:
                    self._set(address, link, up)

    def take_changes(self) -> dict[str, bool]:
        """Watched addresses whose link went up or down since the last call: address -> up."""
        changes, self._changes = self._changes, {}
        return changes

    def close(self) -> None:
        for address in list(self._links):
            self._close(address)

    def _open(self, address: str) -> bool:
        sock = self._context.socket(zmq.DEALER)
        timeout_ms = math.ceil(self.limits.timeout_s * 1000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, -1)  # down is final (module docstring)
        sock.setsockopt(zmq.HANDSHAKE_IVL, timeout_ms)
        sock.setsockopt(zmq.HEARTBEAT_IVL, math.ceil(self.limits.heartbeat_interval_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            sock.connect(f"tcp://{address}")
        except zmq.ZMQError:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close()
            return False
        self._links[address] = _Link(sock, monitor)
        self._by_monitor[monitor] = address
        self._monitors.register(monitor, zmq.POLLIN)
        return True

    def _close(self, address: str) -> None:
        link = self._links.pop(address)
        del self._by_monitor[link.monitor]
        self._monitors.unregister(link.monitor)
        with contextlib.suppress(zmq.ZMQError):
            link.sock.disable_monitor()
        link.monitor.close(linger=0)
        link.sock.close(linger=0)
        if link.up:
            self._set(address, link, False)

    def _set(self, address: str, link: _Link, up: bool) -> None:
        link.up = up
        self._changes[address] = up
        self._stats["transport.link_up" if up else "transport.link_down"] += 1
