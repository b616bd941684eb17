"""An asker's plain-TCP links to members' lookup ports (`meshkv.dataplane.stream`).

`StreamLinks` keeps one connected socket per lookup address, at most `LINKS_MAX` (the least
recently used is closed past that). It belongs to one thread, like the `RequestClient` that
owns it. Every wait is bounded: a link is opened with a connect bounded by
`CONNECT_TIMEOUT_S`; a frame the kernel would not take whole at once (a lookup is a few KiB, so
that means a peer that stopped reading) closes the link; a link that failed is not tried again
for `RETRY_AFTER_S`, and its askers use the member's ZMQ data port meanwhile (`usable`). A
link closed by its peer, or broken, is closed here; replies still owed on it never come, which
its caller's deadline or hedge covers.

This module knows sockets and frame layout; not messages or what a lookup means.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import OrderedDict

from meshkv.dataplane.stream import READ_BYTES, FrameReader, stream_frame
from meshkv.errors import ProtocolError

LINKS_MAX = 128
"""Open links kept; the least recently used closes past this."""
CONNECT_TIMEOUT_S = 0.2
"""Longest a connect may block its thread (a live member on a LAN answers in well under 1 ms)."""
RETRY_AFTER_S = 5.0
"""How long a lookup address that failed is left alone (its member's ZMQ port is used)."""
READS_MAX = 64
"""Reads per `read` call, so one busy link cannot keep its thread."""


class _Link:
    __slots__ = ("address", "fd", "reader", "sock")

    def __init__(self, address: str, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader()


class StreamLinks:
    """Plain-TCP links by lookup address ``host:port`` (see the module docstring)."""

    def __init__(self) -> None:
        self._links: OrderedDict[str, _Link] = OrderedDict()
        self._by_fd: dict[int, _Link] = {}
        self._failed_s: OrderedDict[str, float] = OrderedDict()  # when each link last failed
        self._dropped: list[int] = []  # fds closed since `take_dropped`

    def usable(self, address: str, now_s: float) -> bool:
        """False while ``address`` is left alone after a failure (any thread may ask)."""
        failed_s = self._failed_s.get(address)  # (read only: any thread may ask)
        return failed_s is None or now_s - failed_s >= RETRY_AFTER_S

    def send(self, address: str, frame: bytes) -> int | None:
        """Sends one codec frame to ``address``; the fd its reply will come on (to poll), or
        None if the link could not be opened or would not take the frame (it is then closed)."""
        link = self._links.get(address)
        if link is None:
            link = self._open(address)
            if link is None:
                return None
        else:
            self._links.move_to_end(address)
        data = stream_frame(frame)
        try:
            sent = link.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):  # (a partial send would break the stream's framing)
            self._fail(link)
            return None
        return link.fd

    def read(self, fd: int) -> tuple[list[bytes], bool]:
        """The frames waiting on link ``fd``, and False if the link is gone (closed by the
        peer, broken, or sending garbage) and ``fd`` must not be polled again."""
        link = self._by_fd.get(fd)
        if link is None:
            return [], False
        frames: list[bytes] = []
        for _ in range(READS_MAX):
            try:
                data = link.sock.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return frames, True
            except OSError:
                data = b""
            if not data:
                self._fail(link)
                return frames, False
            try:
                frames += link.reader.feed(data)
            except ProtocolError:
                self._fail(link)
                return frames, False
            if len(data) < READ_BYTES:  # the kernel had no more: a poll tells of what comes
                return frames, True
        return frames, True

    def take_dropped(self) -> list[int]:
        """The fds of the links closed since the last call (not to be polled again)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def close(self) -> None:
        for link in list(self._links.values()):
            self._drop(link)

    def _open(self, address: str) -> _Link | None:
        host, _, port = address.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        except (OSError, ValueError):
            self._note_failure(address)
            return None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self._links) >= LINKS_MAX:
            self._drop(next(iter(self._links.values())))
        link = self._links[address] = _Link(address, sock)
        self._by_fd[link.fd] = link
        return link

    def _fail(self, link: _Link) -> None:
        self._note_failure(link.address)
        self._drop(link)

    def _note_failure(self, address: str) -> None:
        self._failed_s[address] = time.monotonic()
        self._failed_s.move_to_end(address)
        while len(self._failed_s) > LINKS_MAX:
            self._failed_s.popitem(last=False)

    def _drop(self, link: _Link) -> None:
        self._links.pop(link.address, None)
        self._by_fd.pop(link.fd, None)
        self._dropped.append(link.fd)
        with contextlib.suppress(OSError):
            link.sock.close()
