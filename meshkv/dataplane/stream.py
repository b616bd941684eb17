"""Data-plane frames on a plain TCP byte stream: how lookups reach a member's lookup port.

A lookup is one small frame each way. Over ZMQ each frame also crosses an I/O thread on each
side, and that hand-off is most of a round trip's CPU: a bare ZMQ DEALER/ROUTER echo of a
32-key lookup frame costs 128 µs of CPU client + server on the 2-core test host, the same
bytes over a plain TCP socket 56 µs (``python -m tools.bench.lookup.transport_floor``, medians
of 5 blocks).
So every member also listens on a lookup port, and askers send it lookups on a plain TCP
connection. Each frame there is the data-plane codec's own frame (versioned and authenticated
like any other) behind a 4-byte big-endian length. Only messages without attachments travel
this way (lookups and their replies).

`stream_frame` prefixes one frame; `FrameReader` cuts frames out of whatever the socket
delivers. A length above `STREAM_FRAME_MAX` means the stream is broken or hostile: the reader
raises, and its owner closes the connection. A reader never holds more than one frame's
bytes plus one read.

This module knows byte layouts; not sockets, threads or messages.
"""

from __future__ import annotations

from meshkv.errors import ProtocolError

STREAM_PREFIX = "stream:"
"""How a request address names a member's lookup port (``stream:host:port``) rather than its
ZMQ data port (``host:port``)."""
LENGTH_BYTES = 4
STREAM_FRAME_MAX = 1 << 20
"""Largest frame a lookup stream carries (a lookup of `messages.MAX_KEYS` keys is 64 KiB)."""
READ_BYTES = 1 << 16
"""Bytes asked of the socket per read."""


def stream_frame(frame: bytes) -> bytes:
    """``frame`` with its length in front, ready to send."""
    if len(frame) > STREAM_FRAME_MAX:
        raise ProtocolError("stream_frame_too_large", f"{len(frame)} > {STREAM_FRAME_MAX}")
    return len(frame).to_bytes(LENGTH_BYTES, "big") + frame


class FrameReader:
    """The frames in one direction of one connection, as its bytes arrive."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes of a frame not yet complete

    def feed(self, data: bytes) -> list[bytes]:
        """The frames that ``data`` completes, in order; raises ProtocolError (reason
        ``stream_frame_too_large``) if a length is out of bounds: the stream is unusable."""
        if not self._pending:  # the usual case: one read holds whole frames
            frames, used = _cut(data)
            if used < len(data):
                self._pending += data[used:]
            return frames
        self._pending += data
        frames, used = _cut(self._pending)
        del self._pending[:used]
        return frames


def _cut(data: bytes | bytearray) -> tuple[list[bytes], int]:
    """The whole frames at the start of ``data``, and how many bytes they took."""
    frames: list[bytes] = []
    start, end = 0, len(data)
    while end - start >= LENGTH_BYTES:
        size = int.from_bytes(data[start : start + LENGTH_BYTES], "big")
        if size > STREAM_FRAME_MAX:
            raise ProtocolError("stream_frame_too_large", f"{size} > {STREAM_FRAME_MAX}")
        stop = start + LENGTH_BYTES + size
        if stop > end:
            break
        frames.append(bytes(data[start + LENGTH_BYTES : stop]))
        start = stop
    return frames, start
