"""Gossip membership: SWIM with Lifeguard, as a pure core (`Swim`) plus thin drivers.

The core and its helpers never touch sockets, threads or clocks; drivers (``transport``,
``runner``) do, and the simulated network (``simnet``) runs the same core in memory.
"""

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent, Outgoing
from meshkv.gossip.member import MemberInfo, MemberState, MemberView
from meshkv.gossip.messages import gossip_codec
from meshkv.gossip.swim import Swim

__all__ = [
    "EventKind",
    "GossipConfig",
    "MemberEvent",
    "MemberInfo",
    "MemberState",
    "MemberView",
    "Outgoing",
    "Swim",
    "gossip_codec",
]
