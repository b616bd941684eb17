"""The transfer handshake, both directions: what a `Hello` says and what each side does with it.

Before the first transfer between two members, the one that needs the other's memory greets it
(`Hello`: its channel kind, boot nonce, NIXL agent metadata and segments) and the greeted one
answers in kind (`HelloReply`); each side loads the other's memory into its channel. A greeting
is per boot: a peer that restarts (a new nonce) is greeted again, one that died or left is
forgotten. Gossip never carries the metadata; it is exchanged point to point here.

- `Greeter` is the requester's side: greets a peer once per boot, thread-safe (every thread
  that fetches or pushes shares one table).
- `answer_hello` is the greeted side, called by the data-plane service core, which owns the
  table of peers that greeted it (`meshkv.dataplane.service`).

This module knows the channel's handshake half and the hello messages; not rings or stores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.errors import ProtocolError
from meshkv.transfer import Channel


def greeting(channel: Channel, *, req: int, name: str, nonce: int) -> m.Hello:
    """The hello this member sends to a peer it is about to transfer with."""
    return m.Hello(
        req=req,
        sender=name,
        nonce=nonce,
        channel=channel.kind,
        agent=channel.metadata(),
        segments=channel.segments(),
    )


def answer_hello(channel: Channel, hello: m.Hello, *, name: str, nonce: int) -> m.HelloReply:
    """The greeted side: loads the greeter's memory and answers with ours. Loading the same
    memory again is a no-op for the channel, and it reloads memory dropped since (the peer was
    thought lost and is back). Raises ProtocolError("channel_mismatch") if the greeter uses
    another channel kind, ("bad_handshake") if the channel refuses its memory."""
    if hello.channel != channel.kind:
        raise ProtocolError("channel_mismatch", f"{hello.channel} != {channel.kind}")
    if not channel.add_peer(hello.sender, hello.agent, hello.segments):
        raise ProtocolError("bad_handshake", hello.sender)
    return m.HelloReply(
        req=hello.req,
        sender=name,
        nonce=nonce,
        channel=channel.kind,
        agent=channel.metadata(),
        segments=channel.segments(),
    )


class Greeter:
    """The requester's side: which peers (by boot) this member has greeted; any thread."""

    def __init__(
        self,
        channel: Channel,
        *,
        name: str,
        nonce: int,
        on_greeted: Callable[[str], None] | None = None,
    ) -> None:
        self._channel = channel
        self._on_greeted = on_greeted
        """Told each peer this member greets for the first time in its boot (for the log)."""
        self._name = name
        self._nonce = nonce
        self._greeted: dict[str, int] = {}  # peer name -> nonce we exchanged metadata with
        self._lock = threading.Lock()

    def ensure(
        self,
        client: RequestClient,
        *,
        peer: str,
        peer_nonce: int,
        address: str,
        deadline_s: float,
    ) -> bool:
        """Greets ``peer`` (this boot of it) unless done already; False on any failure."""
        if self.has_greeted(peer, peer_nonce):
            return True
        reply = client.call(address, self.hello(client.next_id()), deadline_s)
        return reply is not None and self.accept(peer, peer_nonce, reply)

    def has_greeted(self, peer: str, peer_nonce: int) -> bool:
        with self._lock:
            return self._greeted.get(peer) == peer_nonce

    def hello(self, req: int) -> m.Hello:
        """The hello to send (with `accept` for its reply: a greeting that does not block)."""
        return greeting(self._channel, req=req, name=self._name, nonce=self._nonce)

    def accept(self, peer: str, peer_nonce: int, reply: m.Message) -> bool:
        """Takes ``peer``'s reply to `hello`; True if this boot of it is greeted now."""
        if not isinstance(reply, m.HelloReply) or reply.nonce != peer_nonce:
            return False
        with self._lock:
            if self._greeted.get(peer) == peer_nonce:
                return True
            if not self._channel.add_peer(peer, reply.agent, reply.segments):
                return False
            self._greeted[peer] = peer_nonce
        if self._on_greeted is not None:
            self._on_greeted(peer)
        return True

    def forget(self, peer: str) -> None:
        """A peer died, left or restarted: the next transfer greets it again."""
        with self._lock:
            self._greeted.pop(peer, None)
