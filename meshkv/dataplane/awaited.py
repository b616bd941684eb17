"""`AwaitedReplies`: which of a client's peer sockets a reply is still awaited on.

A client keeps one DEALER per peer (up to `client.PEER_SOCKETS_MAX`), and a poll costs ZMQ a
look at every socket it is given: polling all of them made a lookup at 64 members cost ~120 µs
more CPU than at 2 (measured). A client polls only the sockets this table names: a socket is
in it while a request sent on it has neither been answered nor outlived `REPLY_WAIT_MAX_S`.

Bounds: at most `AWAITED_MAX` requests are remembered (the oldest is forgotten first); an entry
is dropped when its reply arrives, when it is older than `REPLY_WAIT_MAX_S`, or when its socket
is forgotten. A forgotten entry only stops its socket being polled for it: a reply that comes
later waits in the socket's queue and is read (as late) the next time that socket is polled.

Pure bookkeeping: no sockets are touched here (they are only keys), no clock is read.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable

REPLY_WAIT_MAX_S = 120.0
"""How long after a request its socket is still polled for its reply (s): longer than any
data-plane call's deadline, so that no caller waits on a socket that is not polled."""
AWAITED_MAX = 65536
"""Requests remembered at once; past it the oldest is forgotten."""


class AwaitedReplies:
    """Request id -> the socket its reply will come on, for replies still awaited."""

    def __init__(self) -> None:
        self._by_req: OrderedDict[int, tuple[Hashable, float]] = OrderedDict()  # oldest first
        self._per_socket: Counter[Hashable] = Counter()

    def __len__(self) -> int:
        return len(self._by_req)

    def sent(self, req: int, sock: Hashable, now_s: float) -> None:
        """A request ``req`` went out on ``sock`` at ``now_s`` (times never go back)."""
        if req in self._by_req:
            self.answered(req)
        self._by_req[req] = (sock, now_s)
        self._per_socket[sock] += 1
        while len(self._by_req) > AWAITED_MAX:
            self.answered(next(iter(self._by_req)))

    def answered(self, req: int) -> None:
        """A reply to ``req`` came (or it is given up): its socket need not be polled for it."""
        entry = self._by_req.pop(req, None)
        if entry is None:
            return
        sock = entry[0]
        if sock in self._per_socket:
            self._per_socket[sock] -= 1
            if self._per_socket[sock] <= 0:
                del self._per_socket[sock]

    def forget_socket(self, sock: Hashable) -> None:
        """``sock`` is closed: never name it again (its entries drop out as they age)."""
        self._per_socket.pop(sock, None)

    def sockets(self, now_s: float) -> Iterable[Hashable]:
        """The sockets a reply is awaited on at ``now_s`` (entries too old are dropped first)."""
        oldest = now_s - REPLY_WAIT_MAX_S
        while self._by_req:
            req, (_, sent_s) = next(iter(self._by_req.items()))
            if sent_s > oldest:
                break
            self.answered(req)
        return self._per_socket.keys()
