"""Multipart frames in and out of a pyzmq socket, at the least Python cost per frame.

The data plane's loops send and receive one multipart message per request; pyzmq's sugar for
that (`send_multipart`, `recv_multipart`, a non-blocking receive that ends in `zmq.Again`)
spends more of a lookup's CPU than the lookup itself: its flags are enum members (every ``|``
and ``&`` is a Python call), and an empty queue raises an exception (~8 µs). These helpers use
plain integer flags and ask ``ZMQ_EVENTS`` (~3 µs) before receiving.

This module knows pyzmq's socket calls; not the data plane's messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

from meshkv.wire import Buffer

POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)


def readable(sock: zmq.Socket) -> bool:
    """True if a whole message is queued on ``sock`` (ZMQ queues multipart messages whole)."""
    return bool(sock.get(_EVENTS) & POLLIN)


def receive(sock: zmq.Socket, *, copy: bool = True) -> list | None:
    """The next queued multipart message (bytes, or `zmq.Frame`s read in place with ``copy``
    False), or None if none is queued."""
    if not sock.get(_EVENTS) & POLLIN:
        return None
    try:
        if copy:
            parts: list = [sock.recv(_NOBLOCK)]
            while sock.get(_RCVMORE):
                parts.append(sock.recv(_NOBLOCK))
            return parts
        frame = sock.recv(_NOBLOCK, copy=False)
        parts = [frame]
        while frame.more:
            frame = sock.recv(_NOBLOCK, copy=False)
            parts.append(frame)
        return parts
    except zmq.Again:  # (not expected: EVENTS said a message is queued)
        return None


def send(sock: zmq.Socket, parts: Sequence[Buffer]) -> bool:
    """Queues ``parts`` as one multipart message without blocking (copied into ZMQ before this
    returns); False if the socket's queue is full (then nothing was queued)."""
    last = len(parts) - 1
    try:
        for index, part in enumerate(parts):
            sock.send(part, _NOBLOCK_MORE if index < last else _NOBLOCK)
    except zmq.Again:  # only the first part can be refused: ZMQ takes the rest once it has it
        return False
    return True
