"""What the SWIM core hands its driver: member events to publish and frames to send.

This module knows nothing of sockets, threads or how a driver delivers frames.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshkv.gossip.member import MemberView


class EventKind(enum.Enum):
    """A change in how this member sees another member (events never describe oneself)."""

    JOINED = "joined"  # first seen, or seen again with a new boot nonce (a restart)
    UPDATED = "updated"  # alive member changed its address or metadata
    SUSPECT = "suspect"  # alive member is suspected
    ALIVE = "alive"  # suspected, dead or left member is alive again (same boot)
    DEAD = "dead"  # declared dead (failed probes and an expired suspicion)
    LEFT = "left"  # announced a graceful leave


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberEvent:
    kind: EventKind
    member: MemberView


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A frame to send to gossip ``address``, or, when ``address`` is None, to answer on the
    connection that ``reply_to`` names (the value the driver passed to ``Swim.receive``)."""

    address: str | None
    frame: bytes
    reply_to: object | None = None
