"""The lookup port: a member answers lookups sent on plain TCP (`meshkv.dataplane.stream`).

`LookupPort` owns a listening socket and one daemon thread. The thread waits on one epoll of
the listener, a wake-up pipe and every accepted connection; it reads what each connection
sends, answers every lookup with the ``answer`` it was given (`DataService.lookup_reply`, which
reads only the store, the directory and the ring, each behind its own lock, so it runs here
beside the data thread), and writes the replies back in one send per read.

Bounds and bad input: at most `CONNECTIONS_MAX` connections (one past it is closed at once,
counted); a connection's unsent replies at most `OUTBOX_MAX_BYTES` (a peer that stops
reading is closed); a frame that fails to decode, or is not a lookup, is dropped and counted
(``drop_<reason>``) and the connection goes on; a length out of bounds closes the connection
(the stream cannot be resynchronised). Nothing a peer sends can stop the loop.

This module knows sockets and the codec; not what a lookup answer means.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable

from meshkv.dataplane import messages as m
from meshkv.dataplane.stream import READ_BYTES, FrameReader, stream_frame
from meshkv.errors import ProtocolError, TransportError
from meshkv.wire import FrameCodec

log = logging.getLogger("vllm.meshkv.dataplane.lookup_port")

CONNECTIONS_MAX = 1024
"""Connections served at once (each asker keeps one per member it asks)."""
OUTBOX_MAX_BYTES = 4 << 20
"""Replies a connection may leave unread before it is closed."""
IDLE_WAIT_S = 0.5
"""Longest the loop sleeps with nothing to do (stop wakes it at once)."""
LISTEN_BACKLOG = 128

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class _Connection:
    __slots__ = ("outbox", "reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.outbox = bytearray()  # replies not yet taken by the kernel


class LookupPort:
    """Serves lookups on a plain-TCP port (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        codec: FrameCodec,
        answer: Callable[[m.Lookup], m.Message],
    ) -> None:
        self._codec = codec
        self._answer = answer
        try:
            self._listener = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise TransportError(f"cannot bind lookup port {host}:{port}: {exc}") from exc
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_read, self._wake_write = os.pipe()
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), _IN)
        self._epoll.register(self._wake_read, _IN)
        self._connections: dict[int, _Connection] = {}
        self.stats: Counter[str] = Counter()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshkv-lookup-port", daemon=True)

    def start(self) -> None:
        self._running.set()
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the loop and closes every socket (a loop that never started closes them here)."""
        started = self._running.is_set()
        self._running.clear()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if started:
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._close_all()

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        listener, wake = self._listener.fileno(), self._wake_read
        while self._running.is_set():
            for fd, events in self._epoll.poll(IDLE_WAIT_S):
                if fd == listener:
                    self._accept()
                elif fd == wake:
                    continue  # stop() also cleared _running
                elif (connection := self._connections.get(fd)) is not None:
                    if events & (_IN | _GONE):
                        self._read(fd, connection)
                    if events & _OUT and fd in self._connections:
                        self._flush(fd, connection)

    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # (out of fds, say): the loop goes on
                self.stats["accept_failed"] += 1
                log.warning("lookup port: accept failed: %s", exc)
                return
            if len(self._connections) >= CONNECTIONS_MAX:
                self.stats["refused_connections_max"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections[sock.fileno()] = _Connection(sock)
            self._epoll.register(sock.fileno(), _IN)

    def _read(self, fd: int, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the asker closed (or reset) its end
            self._close(fd)
            return
        try:
            frames = connection.reader.feed(data)
        except ProtocolError as exc:
            self.stats[f"drop_{exc.reason}"] += 1
            self._close(fd)
            return
        replies = [self._reply(frame) for frame in frames]
        self._send(fd, connection, b"".join(r for r in replies if r))

    def _reply(self, frame: bytes) -> bytes | None:
        """The reply to one frame, ready to send; None (counted) for a frame to drop."""
        try:
            request = m.decode(self._codec, frame)
        except ProtocolError as exc:
            self.stats[f"drop_{exc.reason}"] += 1
            return None
        if not isinstance(request, m.Lookup):
            self.stats["drop_unexpected_type"] += 1
            return None
        self.stats["rx_lookup"] += 1
        reply = stream_frame(m.encode(self._codec, self._answer(request)))
        self.stats["tx_lookup_reply"] += 1
        return reply

    def _send(self, fd: int, connection: _Connection, data: bytes) -> None:
        if not data:
            return
        if connection.outbox:  # earlier replies wait: keep the order
            self._queue(fd, connection, data)
            return
        try:
            sent = connection.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(fd)
            return
        if sent < len(data):
            self._queue(fd, connection, data[sent:])
            self._epoll.modify(fd, _IN | _OUT)

    def _queue(self, fd: int, connection: _Connection, data: bytes) -> None:
        connection.outbox += data
        if len(connection.outbox) > OUTBOX_MAX_BYTES:
            self.stats["closed_unread"] += 1
            self._close(fd)

    def _flush(self, fd: int, connection: _Connection) -> None:
        try:
            sent = connection.sock.send(connection.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        del connection.outbox[:sent]
        if not connection.outbox:
            self._epoll.modify(fd, _IN)

    def _close(self, fd: int) -> None:
        connection = self._connections.pop(fd, None)
        if connection is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
            connection.sock.close()

    def _close_all(self) -> None:
        for fd in list(self._connections):
            self._close(fd)
        self._epoll.close()
        self._listener.close()
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)
